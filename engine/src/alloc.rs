//! Cluster allocation: each reactor allocates from the allocation groups it owns, without
//! locks; a reactor that runs dry is handed a group by another (a message, see reactor.rs).
//! Freed clusters wait until the journal record that freed them is durable (DESIGN.md 6).

/// A contiguous range of clusters with a free bitmap.
#[derive(Debug)]
pub struct AllocGroup {
    /// Group number (pool-wide).
    pub index: u32,
    /// First cluster (pool-wide index).
    pub first: u64,
    /// Clusters in the group.
    pub count: u64,
    used: Vec<u64>,
    free: u64,
    cursor: u64,
}

impl AllocGroup {
    /// A group with every cluster free.
    pub fn new(index: u32, first: u64, count: u64) -> AllocGroup {
        AllocGroup {
            index,
            first,
            count,
            used: vec![0; count.div_ceil(64) as usize],
            free: count,
            cursor: 0,
        }
    }

    /// Mark a cluster in use (recovery builds groups this way).
    pub fn mark_used(&mut self, cluster: u64) {
        let i = cluster - self.first;
        let (w, b) = ((i / 64) as usize, i % 64);
        if self.used[w] & (1 << b) == 0 {
            self.used[w] |= 1 << b;
            self.free -= 1;
        }
    }

    /// Free clusters left.
    pub fn free(&self) -> u64 {
        self.free
    }

    /// Take one free cluster, searching from the last position (sequential layout for
    /// sequential writers).
    pub fn alloc(&mut self) -> Option<u64> {
        if self.free == 0 {
            return None;
        }
        let words = self.used.len() as u64;
        let start = self.cursor / 64;
        for k in 0..=words {
            let w = ((start + k) % words) as usize;
            let word = self.used[w];
            if word == u64::MAX {
                continue;
            }
            let b = (!word).trailing_zeros() as u64;
            let i = w as u64 * 64 + b;
            if i >= self.count {
                continue;
            }
            self.used[w] |= 1 << b;
            self.free -= 1;
            self.cursor = i + 1;
            return Some(self.first + i);
        }
        None
    }

    /// Return a cluster.
    pub fn release(&mut self, cluster: u64) {
        let i = cluster - self.first;
        let (w, b) = ((i / 64) as usize, i % 64);
        debug_assert!(
            self.used[w] & (1 << b) != 0,
            "double free of cluster {cluster}"
        );
        if self.used[w] & (1 << b) != 0 {
            self.used[w] &= !(1 << b);
            self.free += 1;
        }
    }

    /// Does the group hold this cluster?
    pub fn holds(&self, cluster: u64) -> bool {
        cluster >= self.first && cluster < self.first + self.count
    }
}

/// Split `total` clusters into groups of at most `per_group`.
pub fn groups(total: u64, per_group: u64) -> Vec<AllocGroup> {
    let mut v = Vec::new();
    let mut first = 0;
    while first < total {
        let n = per_group.min(total - first);
        v.push(AllocGroup::new(v.len() as u32, first, n));
        first += n;
    }
    v
}

/// Clusters per group for a pool: enough groups that every reactor owns several (eight
/// when the pool has eight clusters per reactor), at most 32 Ki clusters (2 GiB of 64 KiB
/// clusters) each. A reactor allocates only from groups it owns: in a pool of fewer groups
/// than reactors (a 37-cluster pool of 1 MiB clusters made one group when groups had at
/// least 64 clusters) the group-less reactors answered "pool is full" to every write they
/// owned while donors kept their last group, and would now pass groups back and forth.
pub fn group_size(total: u64, reactors: usize) -> u64 {
    (total / (reactors as u64 * 8)).clamp(1, 32 << 10)
}

/// A reactor's allocator: the groups it owns and the clusters waiting for a durable free.
#[derive(Debug, Default)]
pub struct Allocator {
    /// Groups owned by this reactor.
    pub groups: Vec<AllocGroup>,
    /// Freed in records not yet durable.
    pending: Vec<u64>,
    /// Freed in the journal commit now in flight.
    committing: Vec<u64>,
}

impl Allocator {
    /// One free cluster, or None when every owned group is full.
    pub fn alloc(&mut self) -> Option<u64> {
        // Prefer the group used last so that a writer stays sequential.
        let n = self.groups.len();
        for k in 0..n {
            if let Some(c) = self.groups[k].alloc() {
                if k != 0 {
                    self.groups.swap(0, k);
                }
                return Some(c);
            }
        }
        None
    }

    /// Free clusters in owned groups.
    pub fn free(&self) -> u64 {
        self.groups.iter().map(|g| g.free()).sum()
    }

    /// A cluster was freed by a record not yet durable.
    pub fn free_later(&mut self, cluster: u64) {
        self.pending.push(cluster);
    }

    /// A journal commit starts: the frees recorded so far ride on it.
    pub fn commit_started(&mut self) {
        self.committing.append(&mut self.pending);
    }

    /// True when frees wait for a commit.
    pub fn has_frees(&self) -> bool {
        !self.pending.is_empty() || !self.committing.is_empty()
    }

    /// The commit is durable: its frees may be reused. Returns how many were released here
    /// and the clusters of groups this reactor does not own (to be sent to their owners).
    pub fn commit_done(&mut self) -> (u64, Vec<u64>) {
        let mut foreign = Vec::new();
        let mut released = 0;
        for c in std::mem::take(&mut self.committing) {
            match self.groups.iter_mut().find(|g| g.holds(c)) {
                Some(g) => {
                    g.release(c);
                    released += 1;
                }
                None => foreign.push(c),
            }
        }
        (released, foreign)
    }

    /// Release a cluster of an owned group now (returned by another reactor).
    pub fn release_now(&mut self, c: u64) -> bool {
        match self.groups.iter_mut().find(|g| g.holds(c)) {
            Some(g) => {
                g.release(c);
                true
            }
            None => false,
        }
    }

    /// Give away the owned group with the most free clusters, the last one too (the reactor
    /// decides when it must keep its groups).
    pub fn donate(&mut self) -> Option<AllocGroup> {
        let (i, g) = self
            .groups
            .iter()
            .enumerate()
            .max_by_key(|(_, g)| g.free())?;
        if g.free() == 0 {
            return None;
        }
        Some(self.groups.swap_remove(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_every_cluster_once_then_none() {
        let mut g = AllocGroup::new(0, 100, 130);
        let mut seen = std::collections::HashSet::new();
        while let Some(c) = g.alloc() {
            assert!(g.holds(c));
            assert!(seen.insert(c));
        }
        assert_eq!(seen.len(), 130);
        g.release(150);
        assert_eq!(g.alloc(), Some(150));
    }

    #[test]
    fn every_reactor_gets_groups_even_in_a_small_pool() {
        for (total, reactors) in [(37u64, 2usize), (37, 16), (64, 3), (1 << 20, 4), (5, 8)] {
            let n = groups(total, group_size(total, reactors)).len();
            assert!(
                n >= reactors.min(total as usize),
                "{total} clusters, {reactors} reactors: {n} groups"
            );
        }
        assert_eq!(group_size(1 << 30, 2), 32 << 10);
        assert_eq!(group_size(1600, 2), 100);
    }

    #[test]
    fn donors_give_the_freest_group_then_the_last_but_never_a_full_one() {
        let mut a = Allocator {
            groups: groups(30, 10),
            ..Default::default()
        };
        for _ in 0..15 {
            a.alloc();
        }
        // Groups now hold 5, 0 and 10 free clusters.
        assert_eq!(a.donate().map(|g| g.free()), Some(10));
        assert_eq!(a.donate().map(|g| g.free()), Some(5));
        assert!(a.donate().is_none(), "a full group is never given");
        assert_eq!(a.groups.len(), 1);
        let mut last = Allocator {
            groups: groups(10, 10),
            ..Default::default()
        };
        assert_eq!(last.donate().map(|g| g.free()), Some(10));
        assert!(last.groups.is_empty());
    }

    #[test]
    fn freed_clusters_wait_for_the_commit() {
        let mut a = Allocator {
            groups: groups(64, 64),
            ..Default::default()
        };
        while a.alloc().is_some() {}
        a.free_later(3);
        assert_eq!(a.alloc(), None);
        a.commit_started();
        a.free_later(4);
        assert_eq!(a.commit_done(), (1, vec![]));
        assert_eq!(a.alloc(), Some(3));
        assert_eq!(a.alloc(), None);
    }
}
