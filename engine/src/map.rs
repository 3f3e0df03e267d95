//! A shard's mapping object: an array of entries, one per cluster, kept in pages that
//! snapshots share copy-on-write (DESIGN.md section 3).

use std::sync::Arc;

/// "No cluster": an unallocated entry's `phys`, or an entry without a parent.
pub const NONE: u64 = u64::MAX;
/// Entries per map page (64 × 40 bytes).
pub const ENTRIES_PER_PAGE: usize = 64;

/// One bit per grain of a cluster: a cluster holds at most 64 grains (`Layout::grain`,
/// 4 KiB up to 256 KiB clusters, cluster size / 64 above), so a map entry stays 40 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Validity(pub u64);

impl Validity {
    /// Most grains a cluster holds.
    pub const BITS: u32 = 64;

    /// Bits `first..first + count` set.
    pub fn range(first: u32, count: u32) -> Validity {
        debug_assert!(first + count <= Self::BITS);
        if count == 0 {
            return Validity(0);
        }
        Validity((u64::MAX >> (Self::BITS - count)) << first)
    }
    /// Is grain `b` valid?
    #[inline]
    pub fn get(&self, b: u32) -> bool {
        self.0 & (1 << b) != 0
    }
    /// Mark grain `b` valid.
    pub fn set(&mut self, b: u32) {
        self.0 |= 1 << b;
    }
    /// Mark grain `b` invalid.
    pub fn clear(&mut self, b: u32) {
        self.0 &= !(1 << b);
    }
    /// Union.
    pub fn or(self, o: Validity) -> Validity {
        Validity(self.0 | o.0)
    }
    /// Grains of `self` not in `o`.
    pub fn minus(self, o: Validity) -> Validity {
        Validity(self.0 & !o.0)
    }
    /// True when every bit of `o` is set here.
    pub fn contains(&self, o: Validity) -> bool {
        o.minus(*self).is_empty()
    }
    /// No bit set.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    /// Number of bits set.
    pub fn count(&self) -> u32 {
        self.0.count_ones()
    }
}

/// The state of one cluster of a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// Pool-wide cluster index, or NONE when unallocated.
    pub phys: u64,
    /// Epoch in which this entry was written; `born > S` means the live volume owns it alone.
    pub born: u64,
    /// The cluster (a snapshot's, never changed again) that holds the blocks of `pvalid`,
    /// or NONE.
    pub parent: u64,
    /// Blocks this cluster holds.
    pub valid: Validity,
    /// Blocks not in `valid` that are read from `parent`; any other block reads as zeros.
    /// Every entry resolves on its own: a parent never needs its own parent.
    pub pvalid: Validity,
}

impl MapEntry {
    /// An unallocated entry: reads as zeros.
    pub const UNALLOCATED: MapEntry = MapEntry {
        phys: NONE,
        born: 0,
        parent: NONE,
        valid: Validity(0),
        pvalid: Validity(0),
    };

    /// True when a cluster backs this entry.
    pub fn is_allocated(&self) -> bool {
        self.phys != NONE
    }

    /// Where block `b` is read from: this cluster, the parent, or nowhere (zeros).
    #[inline]
    pub fn source(&self, b: u32) -> Option<u64> {
        if self.phys == NONE {
            None
        } else if self.valid.get(b) {
            Some(self.phys)
        } else if self.parent != NONE && self.pvalid.get(b) {
            Some(self.parent)
        } else {
            None
        }
    }
}

/// A page of entries, shared between a shard and its snapshots until one side changes it.
pub type MapPage = [MapEntry; ENTRIES_PER_PAGE];

/// A shard's map: pages allocated on first write (thin), shared by `Arc` at two levels.
/// A clone (a snapshot's freeze, a checkpoint's cut, a writable clone) shares the whole
/// page table in one step, whatever the number of pages: a 1 TiB volume has 1,024 shards
/// of 256 pages, and taking a reference to every page one by one held a freeze on the
/// reactor for 10-20 ms. The first change after a clone copies the table (one shard's
/// references), then the page it changes.
#[derive(Clone, Debug, Default)]
pub struct ShardMap {
    pages: Arc<[Option<Arc<MapPage>>]>,
}

impl ShardMap {
    /// An empty map of `clusters` entries.
    pub fn new(clusters: usize) -> ShardMap {
        ShardMap {
            pages: vec![None; clusters.div_ceil(ENTRIES_PER_PAGE)].into(),
        }
    }

    /// Number of entry slots.
    pub fn len(&self) -> usize {
        self.pages.len() * ENTRIES_PER_PAGE
    }

    /// True when the map covers no cluster.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// The entry of cluster `i`.
    #[inline]
    pub fn get(&self, i: usize) -> MapEntry {
        match &self.pages[i / ENTRIES_PER_PAGE] {
            Some(p) => p[i % ENTRIES_PER_PAGE],
            None => MapEntry::UNALLOCATED,
        }
    }

    /// Ask the CPU to start loading the entry of cluster `i`, for a lookup that follows
    /// soon: random requests over a large map otherwise stall on each entry in turn.
    #[inline]
    pub fn prefetch(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(Some(p)) = self.pages.get(i / ENTRIES_PER_PAGE) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let first = &p[i % ENTRIES_PER_PAGE] as *const MapEntry as *const i8;
            let last = first.wrapping_add(std::mem::size_of::<MapEntry>() - 1);
            // SAFETY: a prefetch is only a hint: it reads nothing into the program, never
            // faults and changes no memory. Both addresses lie inside one live entry.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(first);
                _mm_prefetch::<_MM_HINT_T0>(last);
            }
        }
    }

    /// Replace the entry of cluster `i`, copying the page table and then the page first if
    /// a snapshot (or a checkpoint) shares them.
    pub fn set(&mut self, i: usize, e: MapEntry) {
        let pi = i / ENTRIES_PER_PAGE;
        if self.pages[pi].is_none() && e == MapEntry::UNALLOCATED {
            return;
        }
        if Arc::get_mut(&mut self.pages).is_none() {
            self.prefetch_page_counts();
        }
        let slot = &mut Arc::make_mut(&mut self.pages)[pi];
        match slot {
            Some(p) => Arc::make_mut(p)[i % ENTRIES_PER_PAGE] = e,
            None if e == MapEntry::UNALLOCATED => {}
            None => {
                let mut page = [MapEntry::UNALLOCATED; ENTRIES_PER_PAGE];
                page[i % ENTRIES_PER_PAGE] = e;
                *slot = Some(Arc::new(page));
            }
        }
    }

    /// Copying a shared page table takes a reference to each of its pages: one atomic
    /// increment per page, each on a line of its own that is rarely cached, and x86 waits
    /// for every locked increment in turn. Asking for all the lines first lets their
    /// misses overlap (the first write to each shard after a snapshot copies its table).
    #[cold]
    fn prefetch_page_counts(&self) {
        #[cfg(target_arch = "x86_64")]
        for p in self.pages.iter().flatten() {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // The counts lie just before the page in its allocation (std's ArcInner today;
            // a wrong guess costs a wasted prefetch, nothing else).
            let count = (Arc::as_ptr(p) as *const i8).wrapping_sub(16);
            // SAFETY: a prefetch is only a hint: it never faults and changes no memory.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(count) };
        }
    }

    /// The pages, shared by `Arc` (checkpoints write each distinct page once).
    pub fn pages(&self) -> &[Option<Arc<MapPage>>] {
        &self.pages
    }

    /// Take page `pi` out of the map (its entries read as unallocated from now on).
    pub fn take_page(&mut self, pi: usize) -> Option<Arc<MapPage>> {
        self.pages.get(pi)?.as_ref()?;
        Arc::make_mut(&mut self.pages)[pi].take()
    }

    /// A map made of these pages.
    pub fn from_pages(pages: Vec<Option<Arc<MapPage>>>) -> ShardMap {
        ShardMap {
            pages: pages.into(),
        }
    }

    /// Every allocated entry with its index, in index order.
    pub fn allocated(&self) -> impl Iterator<Item = (usize, MapEntry)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter_map(|(pi, p)| p.as_ref().map(|p| (pi, p)))
            .flat_map(|(pi, p)| {
                p.iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_allocated())
                    .map(move |(i, e)| (pi * ENTRIES_PER_PAGE + i, *e))
            })
    }

    /// Heap bytes held by this map's pages (shared pages counted once per map).
    pub fn page_bytes(&self) -> usize {
        self.pages.iter().flatten().count() * std::mem::size_of::<MapPage>()
            + self.pages.len() * std::mem::size_of::<Option<Arc<MapPage>>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_entries_are_unallocated() {
        let m = ShardMap::new(1000);
        assert_eq!(m.get(999), MapEntry::UNALLOCATED);
        assert_eq!(m.allocated().count(), 0);
    }

    #[test]
    fn a_shared_page_is_copied_on_first_change() {
        let mut live = ShardMap::new(256);
        let e = MapEntry {
            phys: 5,
            born: 1,
            parent: NONE,
            valid: Validity::range(0, 16),
            pvalid: Validity::default(),
        };
        live.set(3, e);
        live.set(70, e);
        let snap = live.clone();
        live.set(3, MapEntry { phys: 9, ..e });
        assert_eq!(snap.get(3).phys, 5);
        assert_eq!(live.get(3).phys, 9);
        // The untouched page is still shared; the changed one is not.
        assert!(Arc::ptr_eq(
            live.pages()[1].as_ref().unwrap(),
            snap.pages()[1].as_ref().unwrap()
        ));
        assert!(!Arc::ptr_eq(
            live.pages()[0].as_ref().unwrap(),
            snap.pages()[0].as_ref().unwrap()
        ));
        // Writing an unallocated entry where no page exists changes nothing of the clone.
        let before = live.clone();
        live.set(200, MapEntry::UNALLOCATED);
        assert!(Arc::ptr_eq(&live.pages, &before.pages));
    }

    #[test]
    fn validity_ranges_and_sets() {
        let v = Validity::range(50, 10);
        assert!(v.get(50) && v.get(59) && !v.get(60) && !v.get(49));
        assert_eq!(v.count(), 10);
        assert!(Validity::range(0, 64).contains(v));
        assert!(v.minus(Validity::range(50, 10)).is_empty());
        assert_eq!(Validity::range(0, 64).count(), 64);
        assert!(Validity::range(3, 0).is_empty());
        assert_eq!(Validity::range(63, 1).0, 1 << 63);
        // A map entry stays small: pages copied after a snapshot are 2.5 KiB.
        assert_eq!(std::mem::size_of::<MapEntry>(), 40);
    }
}
