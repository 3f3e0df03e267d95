//! The cluster range locks of one shard (DESIGN.md section 4: locks exist only where two
//! owners of a cluster meet, a background job and a host write). Reads and in-place writes
//! share a cluster; anything that changes its map entry holds it alone. Waiters are served
//! in arrival order. Pure bookkeeping: the owner reactor names its waiters (cluster
//! operation keys) and runs the ones a release grants.

use rustc_hash::FxHashMap;
use std::collections::VecDeque;

/// What an operation holds of its cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Held {
    None,
    Shared,
    Exclusive,
}

/// Readers and writers of one cluster.
#[derive(Default, Debug)]
struct ClusterLock {
    shared: u32,
    exclusive: bool,
    /// (waiter, wants it exclusive), in arrival order.
    waiters: VecDeque<(usize, bool)>,
}

impl ClusterLock {
    fn idle(&self) -> bool {
        self.shared == 0 && !self.exclusive && self.waiters.is_empty()
    }
}

/// The locked clusters of one shard, by cluster index; a cluster nobody holds or waits for
/// has no entry.
#[derive(Default, Debug)]
pub(crate) struct RangeLocks(FxHashMap<u32, ClusterLock>);

impl RangeLocks {
    /// Take cluster `idx` for `waiter`, shared or exclusive. True when granted now;
    /// otherwise `waiter` queues behind the others and a later `release` grants it.
    pub(crate) fn acquire(&mut self, idx: u32, waiter: usize, exclusive: bool) -> bool {
        let l = self.0.entry(idx).or_default();
        let granted = if exclusive {
            l.idle()
        } else {
            !l.exclusive && l.waiters.is_empty()
        };
        if !granted {
            l.waiters.push_back((waiter, exclusive));
        } else if exclusive {
            l.exclusive = true;
        } else {
            l.shared += 1;
        }
        granted
    }

    /// Give back what a holder of cluster `idx` held; returns the waiters granted now, in
    /// arrival order, with what each holds (every shared one up to the next exclusive, or
    /// that exclusive one alone).
    pub(crate) fn release(&mut self, idx: u32, held: Held) -> Vec<(usize, Held)> {
        let mut granted = Vec::new();
        let Some(l) = self.0.get_mut(&idx) else {
            return granted;
        };
        match held {
            Held::Shared => l.shared -= 1,
            Held::Exclusive => l.exclusive = false,
            Held::None => {}
        }
        while let Some(&(w, excl)) = l.waiters.front() {
            if excl {
                if l.shared == 0 && !l.exclusive {
                    l.waiters.pop_front();
                    l.exclusive = true;
                    granted.push((w, Held::Exclusive));
                }
                break;
            }
            if l.exclusive {
                break;
            }
            l.waiters.pop_front();
            l.shared += 1;
            granted.push((w, Held::Shared));
        }
        if l.idle() {
            self.0.remove(&idx);
        }
        granted
    }

    /// Clusters held or waited for.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_share_a_cluster_and_a_writer_waits_for_all_of_them() {
        let mut l = RangeLocks::default();
        assert!(l.acquire(5, 1, false));
        assert!(l.acquire(5, 2, false));
        assert!(!l.acquire(5, 3, true));
        assert!(l.release(5, Held::Shared).is_empty());
        assert_eq!(l.release(5, Held::Shared), vec![(3, Held::Exclusive)]);
        assert_eq!(l.release(5, Held::Exclusive), vec![]);
        assert_eq!(l.len(), 0, "an idle cluster leaves no entry");
    }

    #[test]
    fn a_reader_arriving_after_a_waiting_writer_waits_behind_it() {
        let mut l = RangeLocks::default();
        assert!(l.acquire(0, 1, false));
        assert!(!l.acquire(0, 2, true));
        // Not granted though only readers hold it: arrival order is kept.
        assert!(!l.acquire(0, 3, false));
        assert!(!l.acquire(0, 4, false));
        assert_eq!(l.release(0, Held::Shared), vec![(2, Held::Exclusive)]);
        assert_eq!(
            l.release(0, Held::Exclusive),
            vec![(3, Held::Shared), (4, Held::Shared)],
            "the readers behind the writer go together"
        );
    }

    #[test]
    fn an_exclusive_holder_blocks_everyone_and_hands_over_in_order() {
        let mut l = RangeLocks::default();
        assert!(l.acquire(9, 1, true));
        assert!(!l.acquire(9, 2, false));
        assert!(!l.acquire(9, 3, true));
        assert!(!l.acquire(9, 4, false));
        assert_eq!(l.release(9, Held::Exclusive), vec![(2, Held::Shared)]);
        assert_eq!(l.release(9, Held::Shared), vec![(3, Held::Exclusive)]);
        assert_eq!(l.release(9, Held::Exclusive), vec![(4, Held::Shared)]);
        assert_eq!(l.release(9, Held::Shared), vec![]);
        assert_eq!(l.len(), 0);
    }

    #[test]
    fn clusters_lock_independently() {
        let mut l = RangeLocks::default();
        assert!(l.acquire(1, 1, true));
        assert!(l.acquire(2, 2, true));
        assert_eq!(l.len(), 2);
        assert_eq!(l.release(1, Held::Exclusive), vec![]);
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn releasing_nothing_or_an_unknown_cluster_grants_nothing() {
        let mut l = RangeLocks::default();
        assert_eq!(l.release(3, Held::Shared), vec![]);
        assert!(l.acquire(3, 1, true));
        assert_eq!(l.release(3, Held::None), vec![]);
        assert!(!l.acquire(3, 2, false), "still held");
    }
}
