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

/// Pages per group: the second level of a shard's page table.
pub const PAGES_PER_GROUP: usize = 16;

/// A group of page references, shared like the pages themselves.
type Group = [Option<Arc<MapPage>>; PAGES_PER_GROUP];

/// A shard's map: pages allocated on first write (thin), shared by `Arc` at three levels
/// (the table of groups, each group of 16 page references, each page). A clone (a
/// snapshot's freeze, a checkpoint's cut, a writable clone) shares the whole table in one
/// step, whatever the number of pages: a 1 TiB volume has 1,024 shards of 256 pages, and
/// taking a reference to every page one by one held a freeze on the reactor for 10-20 ms.
/// The first change after a clone copies the table (16 group references for a 1 GiB
/// shard), then the group (16 page references), then the page it changes. With one flat
/// table of 256 page references per shard, the first write to each shard after a snapshot
/// took 256 references, a cache miss each: the writes held by the barrier, released
/// together onto different shards, paid that one after another.
#[derive(Clone, Debug, Default)]
pub struct ShardMap {
    groups: Arc<[Option<Arc<Group>>]>,
    /// Page slots (the last group may have fewer in use).
    pages: usize,
}

fn empty_group() -> Group {
    std::array::from_fn(|_| None)
}

impl ShardMap {
    /// An empty map of `clusters` entries.
    pub fn new(clusters: usize) -> ShardMap {
        let pages = clusters.div_ceil(ENTRIES_PER_PAGE);
        ShardMap {
            groups: vec![None; pages.div_ceil(PAGES_PER_GROUP)].into(),
            pages,
        }
    }

    /// Number of entry slots.
    pub fn len(&self) -> usize {
        self.pages * ENTRIES_PER_PAGE
    }

    /// True when the map covers no cluster.
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// Number of page slots.
    pub fn page_count(&self) -> usize {
        self.pages
    }

    /// Page `pi`, if any entry of it was ever written.
    #[inline]
    pub fn page(&self, pi: usize) -> Option<&Arc<MapPage>> {
        self.groups.get(pi / PAGES_PER_GROUP)?.as_ref()?[pi % PAGES_PER_GROUP].as_ref()
    }

    /// Every page slot in order (shared pages are the same `Arc`: checkpoints write each
    /// distinct page once).
    pub fn pages(&self) -> impl Iterator<Item = Option<&Arc<MapPage>>> + '_ {
        (0..self.pages).map(|pi| self.page(pi))
    }

    /// The entry of cluster `i`.
    #[inline]
    pub fn get(&self, i: usize) -> MapEntry {
        match self.page(i / ENTRIES_PER_PAGE) {
            Some(p) => p[i % ENTRIES_PER_PAGE],
            None => MapEntry::UNALLOCATED,
        }
    }

    /// Ask the CPU to start loading the entry of cluster `i`, for a lookup that follows
    /// soon: random requests over a large map otherwise stall on each entry in turn.
    #[inline]
    pub fn prefetch(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = self.page(i / ENTRIES_PER_PAGE) {
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

    /// Replace the entry of cluster `i`, copying the table, the group and then the page
    /// first where a snapshot (or a checkpoint) shares them.
    pub fn set(&mut self, i: usize, e: MapEntry) {
        let pi = i / ENTRIES_PER_PAGE;
        if e == MapEntry::UNALLOCATED && self.page(pi).is_none() {
            return;
        }
        let slot = self.page_slot(pi);
        match slot {
            Some(p) => Arc::make_mut(p)[i % ENTRIES_PER_PAGE] = e,
            None => {
                let mut page = [MapEntry::UNALLOCATED; ENTRIES_PER_PAGE];
                page[i % ENTRIES_PER_PAGE] = e;
                *slot = Some(Arc::new(page));
            }
        }
    }

    /// The slot of page `pi`, owned by this map alone (the table and its group copied
    /// first if shared; a missing group is made).
    fn page_slot(&mut self, pi: usize) -> &mut Option<Arc<MapPage>> {
        if Arc::get_mut(&mut self.groups).is_none() {
            prefetch_counts(self.groups.iter().flatten());
        }
        let group = Arc::make_mut(&mut self.groups)[pi / PAGES_PER_GROUP]
            .get_or_insert_with(|| Arc::new(empty_group()));
        if Arc::get_mut(group).is_none() {
            prefetch_counts(group.iter().flatten());
        }
        &mut Arc::make_mut(group)[pi % PAGES_PER_GROUP]
    }

    /// Take page `pi` out of the map (its entries read as unallocated from now on).
    pub fn take_page(&mut self, pi: usize) -> Option<Arc<MapPage>> {
        self.page(pi)?;
        self.page_slot(pi).take()
    }

    /// A map made of these pages.
    pub fn from_pages(pages: Vec<Option<Arc<MapPage>>>) -> ShardMap {
        let n = pages.len();
        let mut groups = Vec::with_capacity(n.div_ceil(PAGES_PER_GROUP));
        let mut it = pages.into_iter();
        for _ in 0..n.div_ceil(PAGES_PER_GROUP) {
            let mut g = empty_group();
            for (slot, p) in g.iter_mut().zip(it.by_ref()) {
                *slot = p;
            }
            groups.push(g.iter().any(Option::is_some).then(|| Arc::new(g)));
        }
        ShardMap {
            groups: groups.into(),
            pages: n,
        }
    }

    /// Every allocated entry with its index, in index order.
    pub fn allocated(&self) -> impl Iterator<Item = (usize, MapEntry)> + '_ {
        self.pages()
            .enumerate()
            .filter_map(|(pi, p)| p.map(|p| (pi, p)))
            .flat_map(|(pi, p)| {
                p.iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_allocated())
                    .map(move |(i, e)| (pi * ENTRIES_PER_PAGE + i, *e))
            })
    }

    /// Heap bytes held by this map's pages and tables (shared ones counted once per map).
    pub fn page_bytes(&self) -> usize {
        self.pages().flatten().count() * std::mem::size_of::<MapPage>()
            + self.groups.iter().flatten().count() * std::mem::size_of::<Group>()
            + self.groups.len() * std::mem::size_of::<Option<Arc<Group>>>()
    }
}

/// Copying a shared table or group takes a reference to each item it holds: one atomic
/// increment each, on lines of their own that are rarely cached, and x86 waits for every
/// locked increment in turn. Asking for all the lines first lets their misses overlap.
#[cold]
fn prefetch_counts<'a, T: 'a>(items: impl Iterator<Item = &'a Arc<T>>) {
    #[cfg(target_arch = "x86_64")]
    for p in items {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // The counts lie just before the value in its allocation (std's ArcInner today; a
        // wrong guess costs a wasted prefetch, nothing else).
        let count = (Arc::as_ptr(p) as *const i8).wrapping_sub(16);
        // SAFETY: a prefetch is only a hint: it never faults and changes no memory.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(count) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry of a 64 KiB cluster written whole, no parent.
    fn owned_entry() -> MapEntry {
        MapEntry {
            phys: 5,
            born: 1,
            parent: NONE,
            valid: Validity::range(0, 16),
            pvalid: Validity::default(),
        }
    }

    #[test]
    fn unwritten_entries_are_unallocated() {
        let m = ShardMap::new(1000);
        assert_eq!(m.get(999), MapEntry::UNALLOCATED);
        assert_eq!(m.allocated().count(), 0);
    }

    #[test]
    fn a_shared_page_is_copied_on_first_change() {
        let mut live = ShardMap::new(256);
        let e = owned_entry();
        live.set(3, e);
        live.set(70, e);
        let snap = live.clone();
        live.set(3, MapEntry { phys: 9, ..e });
        assert_eq!(snap.get(3).phys, 5);
        assert_eq!(live.get(3).phys, 9);
        // The untouched page is still shared; the changed one is not.
        assert!(Arc::ptr_eq(live.page(1).unwrap(), snap.page(1).unwrap()));
        assert!(!Arc::ptr_eq(live.page(0).unwrap(), snap.page(0).unwrap()));
        // Writing an unallocated entry where no page exists changes nothing of the clone.
        let before = live.clone();
        live.set(200, MapEntry::UNALLOCATED);
        assert!(Arc::ptr_eq(&live.groups, &before.groups));
    }

    #[test]
    fn a_write_after_a_clone_copies_one_group_and_one_page() {
        let e = owned_entry();
        // 40 pages: groups of 16, 16 and 8.
        let mut live = ShardMap::new(40 * ENTRIES_PER_PAGE);
        for pi in 0..40 {
            live.set(
                pi * ENTRIES_PER_PAGE,
                MapEntry {
                    phys: pi as u64,
                    ..e
                },
            );
        }
        let snap = live.clone();
        live.set(17 * ENTRIES_PER_PAGE + 3, e);
        let g = |m: &ShardMap, k: usize| m.groups[k].as_ref().map(Arc::as_ptr);
        assert_eq!(g(&live, 0), g(&snap, 0), "group 0 still shared");
        assert_eq!(g(&live, 2), g(&snap, 2), "group 2 still shared");
        assert_ne!(g(&live, 1), g(&snap, 1), "group 1 copied");
        // In the copied group only page 17 is a copy; its neighbours are the same pages.
        assert!(Arc::ptr_eq(live.page(16).unwrap(), snap.page(16).unwrap()));
        assert!(!Arc::ptr_eq(live.page(17).unwrap(), snap.page(17).unwrap()));
        assert_eq!(snap.get(17 * ENTRIES_PER_PAGE + 3), MapEntry::UNALLOCATED);
        assert_eq!(live.get(17 * ENTRIES_PER_PAGE + 3), e);
        // Pages out and back in: the same map, sharing the same pages.
        let again = ShardMap::from_pages(live.pages().map(|p| p.cloned()).collect());
        assert_eq!(again.page_count(), 40);
        assert_eq!(again.len(), live.len());
        assert!(live.allocated().eq(again.allocated()));
        assert!(Arc::ptr_eq(again.page(39).unwrap(), live.page(39).unwrap()));
        // Taking a page out leaves the snapshot's copy alone.
        let mut taken = snap.clone();
        assert_eq!(taken.take_page(39).unwrap()[0].phys, 39);
        assert_eq!(taken.page(39), None);
        assert_eq!(snap.get(39 * ENTRIES_PER_PAGE).phys, 39);
        assert_eq!(taken.take_page(39), None);
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
