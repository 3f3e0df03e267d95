//! Pool geometry in memory: where a cluster lives, how volumes are cut into shards.

use crate::format::Superblock;

/// The geometry every reactor reads (immutable while the pool is open).
#[derive(Clone, Debug)]
pub struct Layout {
    /// Member 0's superblock (metadata region offsets).
    pub sb: Superblock,
    pub cluster_size: u64,
    pub shard_size: u64,
    pub total_clusters: u64,
    /// Per member: (first pool-wide cluster, clusters, byte offset of its first cluster).
    pub members: Vec<(u64, u64, u64)>,
    /// log2 of the cluster size (a power of two, checked at format).
    cluster_shift: u32,
    /// log2 of the shard size when it is a power of two (the default), for `shard_of`.
    shard_shift: Option<u32>,
}

impl Layout {
    /// Build from every member's superblock, ordered by member index.
    pub fn new(sbs: &[Superblock]) -> Layout {
        let sb = sbs[0].clone();
        debug_assert!(sb.cluster_size.is_power_of_two());
        Layout {
            cluster_shift: sb.cluster_size.trailing_zeros(),
            shard_shift: sb
                .shard_size
                .is_power_of_two()
                .then(|| sb.shard_size.trailing_zeros()),
            cluster_size: sb.cluster_size as u64,
            shard_size: sb.shard_size,
            total_clusters: sb.total_clusters,
            members: sbs
                .iter()
                .map(|s| (s.first_cluster, s.member_clusters, s.data_start))
                .collect(),
            sb,
        }
    }

    /// Bytes per validity bit (a "block" of the datapath): 4 KiB, or cluster size / 64 for
    /// clusters above 256 KiB, so that a cluster holds at most 64 (`Validity::BITS`).
    #[inline]
    pub fn grain(&self) -> u32 {
        1 << self.grain_shift()
    }

    /// Grains per cluster (at most 64).
    pub fn blocks_per_cluster(&self) -> u32 {
        1 << (self.cluster_shift - self.grain_shift())
    }

    /// log2 of the grain: 12, or the cluster's shift less log2(`Validity::BITS`) = 6.
    #[inline]
    fn grain_shift(&self) -> u32 {
        self.cluster_shift
            .saturating_sub(crate::map::Validity::BITS.trailing_zeros())
            .max(12)
    }

    /// The shard holding byte `off` of a volume (a shift on the request path, not a
    /// division, for the usual power-of-two shard size).
    #[inline]
    pub fn shard_of(&self, off: u64) -> u64 {
        match self.shard_shift {
            Some(s) => off >> s,
            None => off / self.shard_size,
        }
    }

    /// (cluster index, byte offset in that cluster) of byte `in_shard` of a shard.
    #[inline]
    pub fn cluster_of(&self, in_shard: u64) -> (u32, u32) {
        let idx = in_shard >> self.cluster_shift;
        (idx as u32, (in_shard - (idx << self.cluster_shift)) as u32)
    }

    /// Clusters per shard.
    pub fn clusters_per_shard(&self) -> u64 {
        self.shard_size / self.cluster_size
    }

    /// (member, byte offset) of byte `off` of cluster `c`.
    #[inline]
    pub fn locate(&self, c: u64, off: u64) -> (usize, u64) {
        let m = self
            .members
            .iter()
            .rposition(|&(first, _, _)| first <= c)
            .unwrap_or(0);
        let (first, _, start) = self.members[m];
        (m, start + (c - first) * self.cluster_size + off)
    }

    /// Shards a volume of `size` bytes needs.
    pub fn shards_for(&self, size: u64) -> u64 {
        size.div_ceil(self.shard_size)
    }
}

#[cfg(test)]
mod tests {
    use crate::format::{plan, FormatOptions};

    #[test]
    fn the_grain_is_4k_up_to_256k_clusters_then_a_64th() {
        for (cluster, grain, per) in [
            (4u32 << 10, 4096, 1),
            (64 << 10, 4096, 16),
            (256 << 10, 4096, 64),
            (512 << 10, 8192, 64),
            (1 << 20, 16384, 64),
        ] {
            let opts = FormatOptions {
                cluster_size: cluster,
                ..FormatOptions::default()
            };
            let sbs = plan(&[1 << 30], &opts, [7; 16]).expect("plan");
            let l = super::Layout::new(&sbs);
            assert_eq!(
                (l.grain(), l.blocks_per_cluster()),
                (grain, per),
                "{cluster}"
            );
        }
    }
}
