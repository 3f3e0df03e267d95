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
}

impl Layout {
    /// Build from every member's superblock, ordered by member index.
    pub fn new(sbs: &[Superblock]) -> Layout {
        let sb = sbs[0].clone();
        Layout {
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

    /// 4 KiB blocks per cluster.
    pub fn blocks_per_cluster(&self) -> u32 {
        (self.cluster_size / 4096) as u32
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
