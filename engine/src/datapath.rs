//! The data path on the owner reactor: a piece is cut into cluster operations; each takes
//! the cluster's range lock, resolves the map entry (DESIGN.md section 3), does its device
//! I/O through io_uring, updates the map and journal, and finishes its part of the request.

use crate::backend::DevOp;
use crate::buf::AlignedBuf;
use crate::dispatch::FLUSH_SHARD;
use crate::error::IoError;
use crate::io::{Extent, Op};
use crate::map::{MapEntry, ShardMap, Validity, NONE};
use crate::rangelock::{Held, RangeLocks};
use crate::reactor::{bump, Cont, Msg, Piece, Reactor, Shard, Waiter};
use crate::request::Parent;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Device alignment of an in-place write (O_DIRECT).
const DEV_ALIGN: u32 = 4096;

/// Which way a cluster operation's device I/O goes.
#[derive(Clone, Copy, Debug)]
enum Dir {
    Read,
    /// With `fua`, durable before it completes (only in-place writes: a write to a new
    /// cluster is durable with the commit that points the map at it).
    Write {
        fua: bool,
    },
}

/// Bytes `coff..coff + len` of cluster `cluster`.
#[derive(Clone, Copy, Debug)]
struct At {
    cluster: u64,
    coff: u32,
    len: u32,
}

impl At {
    fn new(cluster: u64, coff: u32, len: u32) -> At {
        At { cluster, coff, len }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    Start,
    Read,
    RmwRead,
    Write,
    Durable,
}

/// The part of a request inside one cluster.
pub(crate) struct ClusterOp {
    /// The request this is part of; `finish_op` takes it (see `parent`).
    parent: Option<Arc<Parent>>,
    pub(crate) kind: Op,
    pub(crate) vol: u64,
    pub(crate) shard: u64,
    pub(crate) idx: u32,
    /// Byte range inside the cluster.
    coff: u32,
    clen: u32,
    /// Where the bytes sit in the caller's buffer.
    buf_off: usize,
    vol_off: u64,
    pub(crate) held: Held,
    pub(crate) stage: Stage,
    pending: u32,
    err: Option<IoError>,
    /// Cluster being written, and whether this operation allocated it.
    pub(crate) target: u64,
    pub(crate) fresh: bool,
    pub(crate) new_entry: Option<MapEntry>,
    /// Read-modify-write buffer holding the whole cluster.
    pub(crate) bounce: Option<AlignedBuf>,
    /// Blocks written from the bounce buffer to `target`.
    pub(crate) write_set: Validity,
    /// Clusters whose reference the new entry drops (checked once it is applied).
    pub(crate) drops: [u64; 2],
    /// Write zeros rather than the caller's data.
    zeros: bool,
    /// A background job rather than a host request.
    pub(crate) job: Job,
    /// For jobs: the entry the job's copy was computed from (boxed: host requests, the
    /// many, carry no base, and a smaller operation is cheaper to create and drop).
    pub(crate) base: Option<Box<MapEntry>>,
}

/// Background work on one cluster of a live volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// A host request.
    None,
    /// Copy the blocks a redirected cluster still reads from its parent, then drop it.
    Fill,
    /// Give a clone's cluster its own copy of everything it reads (clone inflate).
    Inflate,
}

/// Where a cluster operation works: image, shard, cluster, byte range inside the cluster,
/// and where those bytes sit in the caller's buffer and in the volume.
pub(crate) struct Span {
    pub vol: u64,
    pub shard: u64,
    pub idx: u32,
    pub coff: u32,
    pub clen: u32,
    pub buf_off: usize,
    pub vol_off: u64,
}

impl ClusterOp {
    /// An operation of `kind` (a host request, or a background `job`) on `span`.
    pub(crate) fn new(parent: Arc<Parent>, kind: Op, job: Job, span: Span) -> ClusterOp {
        let Span {
            vol,
            shard,
            idx,
            coff,
            clen,
            buf_off,
            vol_off,
        } = span;
        ClusterOp {
            parent: Some(parent),
            kind,
            vol,
            shard,
            idx,
            coff,
            clen,
            buf_off,
            vol_off,
            held: Held::None,
            stage: Stage::Start,
            pending: 0,
            err: None,
            target: NONE,
            fresh: false,
            new_entry: None,
            bounce: None,
            write_set: Validity::default(),
            drops: [NONE; 2],
            zeros: false,
            job,
            base: None,
        }
    }

    /// The request this operation is part of.
    pub(crate) fn parent(&self) -> &Parent {
        self.parent
            .as_ref()
            .expect("an operation holds its request until it finishes")
    }
}

impl Shard {
    /// An empty shard of `clusters` clusters.
    pub fn new(clusters: usize) -> Shard {
        Shard {
            map: ShardMap::new(clusters),
            locks: RangeLocks::default(),
        }
    }
}

/// Runs of consecutive blocks of `set` (below `bpc`) on which `key` agrees: (first, count, key).
/// An iterator, so that the bounce paths allocate nothing per cluster.
fn runs<K: PartialEq>(
    set: Validity,
    bpc: u32,
    key: impl Fn(u32) -> K,
) -> impl Iterator<Item = (u32, u32, K)> {
    let mut b = 0;
    std::iter::from_fn(move || {
        while b < bpc && !set.get(b) {
            b += 1;
        }
        if b >= bpc {
            return None;
        }
        let (first, k) = (b, key(b));
        b += 1;
        while b < bpc && set.get(b) && key(b) == k {
            b += 1;
        }
        Some((first, b - first, k))
    })
}

/// (first grain, grains) that bytes `coff..coff + clen` of a cluster touch.
fn blocks(coff: u32, clen: u32, g: u32) -> (u32, u32) {
    let first = coff / g;
    let end = (coff + clen).div_ceil(g);
    (first, end - first)
}

impl Reactor {
    /// A piece arrived: cut it into cluster operations.
    pub(crate) fn start_piece(&mut self, p: Piece) {
        let st = &self.shared.stats[self.id];
        match p.parent.op {
            Op::Read => {
                bump(&st.reads, 1);
                bump(&st.read_bytes, p.len);
            }
            Op::Write { .. } => {
                bump(&st.writes, 1);
                bump(&st.write_bytes, p.len);
            }
            Op::Flush => bump(&st.flushes, 1),
            _ => {}
        }
        if p.shard == FLUSH_SHARD {
            self.commit_wanted(Some(Waiter::Flush(p.parent)));
            return;
        }
        let cs = self.shared.layout.cluster_size;
        let cps = self.shared.layout.clusters_per_shard() as usize;
        let ss = self.shared.layout.shard_size;
        let Some(vol) = self.vols.get_mut(&p.vol).filter(|v| !v.deleting) else {
            let _ = self.reply(&p.parent, Err(IoError::UnknownVolume));
            return;
        };
        if p.off + p.len > vol.size {
            let e = IoError::OutOfRange {
                offset: p.off,
                len: p.len,
                size: vol.size,
            };
            let _ = self.reply(&p.parent, Err(e));
            return;
        }
        if p.parent.op.is_write() && vol.read_only {
            let _ = self.reply(&p.parent, Err(IoError::ReadOnly));
            return;
        }
        if let Some(hold) = &mut vol.hold {
            if hold.all || p.parent.op.is_write() {
                hold.pieces.push(p);
                return;
            }
        }
        let map = &vol
            .shards
            .entry(p.shard)
            .or_insert_with(|| Shard::new(cps))
            .map;
        let Piece {
            parent,
            vol: vid,
            shard,
            off,
            len,
            buf_off,
        } = p;
        let base = shard * ss;
        let end = off + len;
        let layout = &self.shared.layout;
        let n = layout.cluster_of(end - 1 - base).0 - layout.cluster_of(off - base).0 + 1;
        if n > 1 {
            parent.add_parts(n - 1);
        }
        vol.inflight += n;
        if parent.op.is_write() {
            vol.writes_inflight += n;
        }
        let kind = parent.op;
        // Each operation holds a reference; the last one takes the piece's own.
        let mut parent = Some(parent);
        let mut pos = off;
        while pos < end {
            let (idx, coff) = layout.cluster_of(pos - base);
            let clen = (cs - coff as u64).min(end - pos) as u32;
            let span = Span {
                vol: vid,
                shard,
                idx,
                coff,
                clen,
                buf_off: buf_off + (pos - off) as usize,
                vol_off: pos,
            };
            // The operation looks its entry up once it runs, after this pass's others.
            map.prefetch(idx as usize);
            pos += clen as u64;
            let mine = if pos < end {
                parent.clone()
            } else {
                parent.take()
            };
            let op = ClusterOp::new(
                mine.expect("a reference per operation"),
                kind,
                Job::None,
                span,
            );
            let k = self.ops.insert(op);
            self.ready.push_back(k);
        }
    }

    fn shard_mut(&mut self, vol: u64, shard: u64) -> Option<&mut Shard> {
        self.vols.get_mut(&vol)?.shards.get_mut(&shard)
    }

    pub(crate) fn entry_of(&self, i: usize) -> Option<(MapEntry, u64)> {
        let op = self.ops.get(i)?;
        let v = self.vols.get(&op.vol)?;
        let s = v.shards.get(&op.shard)?;
        Some((s.map.get(op.idx as usize), v.snap_epoch))
    }

    /// Run (or resume) a cluster operation.
    pub(crate) fn run_op(&mut self, i: usize) {
        let Some(op) = self.ops.get(i) else { return };
        if op.stage != Stage::Start {
            return;
        }
        if op.job != Job::None {
            let job = op.job;
            return self.op_job(i, job);
        }
        match op.kind {
            Op::BlockStatus => {
                let (e, _) = self.entry_of(i).unwrap_or((MapEntry::UNALLOCATED, 0));
                let op = self.ops.get(i).expect("op");
                op.parent().add_extents(&[Extent {
                    offset: op.vol_off,
                    len: op.clen as u64,
                    allocated: e.is_allocated(),
                }]);
                self.finish_op(i, Ok(()));
            }
            Op::Read => self.op_read(i),
            Op::Write { .. } => self.op_write(i),
            Op::Trim | Op::WriteZeroes { .. } => self.op_discard(i),
            Op::Flush => self.finish_op(i, Ok(())),
        }
    }

    pub(crate) fn acquire(&mut self, i: usize, exclusive: bool) -> bool {
        let (held, vol, shard, idx) = {
            let op = self.ops.get(i).expect("op");
            (op.held, op.vol, op.shard, op.idx)
        };
        match (held, exclusive) {
            (Held::Exclusive, _) | (Held::Shared, false) => return true,
            (Held::Shared, true) => self.release(i),
            _ => {}
        }
        let Some(s) = self.shard_mut(vol, shard) else {
            return true;
        };
        let granted = s.locks.acquire(idx, i, exclusive);
        if granted {
            self.ops.get_mut(i).expect("op").held = if exclusive {
                Held::Exclusive
            } else {
                Held::Shared
            };
        }
        granted
    }

    /// Drop the operation's lock and hand the cluster to the next waiters in order.
    fn release(&mut self, i: usize) {
        let (held, vol, shard, idx) = {
            let op = self.ops.get_mut(i).expect("op");
            let h = op.held;
            op.held = Held::None;
            (h, op.vol, op.shard, op.idx)
        };
        if held == Held::None {
            return;
        }
        let granted = match self.shard_mut(vol, shard) {
            Some(s) => s.locks.release(idx, held),
            None => Vec::new(),
        };
        for (w, h) in granted {
            if let Some(op) = self.ops.get_mut(w) {
                op.held = h;
                self.ready.push_back(w);
            }
        }
    }

    fn op_read(&mut self, i: usize) {
        if !self.acquire(i, false) {
            return;
        }
        let Some((e, _)) = self.entry_of(i) else {
            return self.finish_op(i, Err(IoError::UnknownVolume));
        };
        let (coff, clen, buf_off) = {
            let op = self.ops.get_mut(i).expect("op");
            op.stage = Stage::Read;
            (op.coff, op.clen, op.buf_off)
        };
        let g = self.shared.layout.grain();
        if !(coff | clen | buf_off as u32).is_multiple_of(self.sector) {
            // Not on the device's sector boundaries (a 512-byte block on a 4Kn device):
            // read the whole grains into a bounce buffer; `maybe_advance` copies the bytes
            // asked for out of it.
            let (fb, nb) = blocks(coff, clen, g);
            let bounce = self.bounces.take(self.shared.layout.cluster_size as usize);
            self.ops.get_mut(i).expect("op").bounce = Some(bounce);
            self.read_blocks_into_bounce(i, &e, Validity::range(fb, nb));
            return self.maybe_advance(i);
        }
        let end = coff + clen;
        // Runs of grains read from one cluster (this one or the parent); others are zeros.
        let mut run: Option<(u64, u32, u32)> = None;
        let mut b = coff / g;
        while b * g < end {
            let s = (b * g).max(coff);
            let t = ((b + 1) * g).min(end);
            let src = e.source(b);
            match (run, src) {
                (Some((c, rs, _)), Some(x)) if c == x => run = Some((c, rs, t)),
                _ => {
                    if let Some((c, rs, rt)) = run.take() {
                        let at = At::new(c, rs, rt - rs);
                        self.submit_data(i, Dir::Read, at, buf_off + (rs - coff) as usize);
                    }
                    match src {
                        Some(x) => run = Some((x, s, t)),
                        None => {
                            let op = self.ops.get(i).expect("op");
                            // SAFETY: bytes s..t of this cluster belong to this operation only.
                            unsafe {
                                op.parent()
                                    .slice(buf_off + (s - coff) as usize, (t - s) as usize)
                            }
                            .fill(0);
                        }
                    }
                }
            }
            b += 1;
        }
        if let Some((c, rs, rt)) = run {
            let at = At::new(c, rs, rt - rs);
            self.submit_data(i, Dir::Read, at, buf_off + (rs - coff) as usize);
        }
        self.maybe_advance(i);
    }

    fn op_write(&mut self, i: usize) {
        let Some((e, snap)) = self.entry_of(i) else {
            return self.finish_op(i, Err(IoError::UnknownVolume));
        };
        let (coff, clen, zeros, fua) = {
            let op = self.ops.get(i).expect("op");
            (
                op.coff,
                op.clen,
                op.zeros,
                matches!(
                    op.kind,
                    Op::Write { fua: true } | Op::WriteZeroes { fua: true }
                ),
            )
        };
        let owned = e.is_allocated() && e.born > snap;
        let g = self.shared.layout.grain();
        let aligned = coff % g == 0 && clen % g == 0;
        let (fb, nb) = blocks(coff, clen, g);
        let touched = Validity::range(fb, nb);
        let dev_aligned = coff % DEV_ALIGN == 0 && clen % DEV_ALIGN == 0 && self.buf_aligned(i);
        if !zeros && owned && dev_aligned && e.valid.contains(touched) {
            // In place: the live volume owns the cluster and every block is valid.
            if !self.acquire(i, false) {
                return;
            }
            let (e2, _) = self.entry_of(i).expect("entry");
            if e2 == e {
                let buf_off = {
                    let op = self.ops.get_mut(i).expect("op");
                    op.stage = Stage::Write;
                    op.buf_off
                };
                let at = At::new(e.phys, coff, clen);
                self.submit_data(i, Dir::Write { fua }, at, buf_off);
                return self.maybe_advance(i);
            }
        }
        if !self.acquire(i, true) {
            return;
        }
        let (e, snap) = self.entry_of(i).expect("entry");
        let owned = e.is_allocated() && e.born > snap;
        let target = if owned {
            e.phys
        } else {
            match self.alloc_cluster() {
                Some(c) => c,
                None => return self.wait_space(i),
            }
        };
        let epoch = self.shared.epoch.load(Ordering::Relaxed);
        // Blocks to copy into the target besides the written ones: those a redirected entry
        // reads from its own parent (a parent never has a parent itself).
        let mut copy = Validity::default();
        let new_entry = if owned {
            MapEntry {
                valid: e.valid.or(touched),
                ..e
            }
        } else if e.is_allocated() {
            // Redirect: the snapshot keeps `e`; new blocks go to a new cluster and the rest
            // is read from e's cluster until fill copies it.
            let keep = e.valid.minus(touched);
            if e.parent != NONE {
                copy = e.pvalid.minus(e.valid).minus(touched);
            }
            let parent = if keep.is_empty() { NONE } else { e.phys };
            MapEntry {
                phys: target,
                born: epoch,
                parent,
                valid: touched.or(copy),
                pvalid: keep,
            }
        } else {
            MapEntry {
                phys: target,
                born: epoch,
                parent: NONE,
                valid: touched,
                pvalid: Validity::default(),
            }
        };
        let mut edges = Validity::default();
        if coff % g != 0 {
            edges.set(fb);
        }
        if (coff + clen) % g != 0 {
            edges.set(fb + nb - 1);
        }
        {
            let op = self.ops.get_mut(i).expect("op");
            op.target = target;
            op.fresh = !owned;
            op.new_entry = Some(new_entry);
            if !owned && e.is_allocated() {
                // The live volume stops pointing at e's clusters (the snapshot still may).
                op.drops = [e.phys, e.parent];
            }
        }
        if aligned && !zeros && copy.is_empty() && self.buf_aligned(i) {
            let buf_off = {
                let op = self.ops.get_mut(i).expect("op");
                op.stage = Stage::Write;
                op.buf_off
            };
            let at = At::new(target, coff, clen);
            self.submit_data(i, Dir::Write { fua: false }, at, buf_off);
            return self.maybe_advance(i);
        }
        // Merge into a cluster-sized bounce buffer: the edge blocks' and copied blocks'
        // current contents first, then the new bytes.
        let reads = edges.or(copy);
        {
            let bounce = self.bounces.take(self.shared.layout.cluster_size as usize);
            let op = self.ops.get_mut(i).expect("op");
            op.bounce = Some(bounce);
            op.write_set = touched.or(copy);
            op.stage = Stage::RmwRead;
        }
        self.read_blocks_into_bounce(i, &e, reads);
        self.maybe_advance(i);
    }

    /// Read each block of `set` from where `e` says it lives into the bounce buffer, and
    /// zero those that live nowhere (they read as zeros). The bounce buffer is reused, not
    /// freshly zeroed: every block of it that is later written to the device is one of
    /// these, or lies wholly inside the caller's range, which `maybe_advance` fills.
    pub(crate) fn read_blocks_into_bounce(&mut self, i: usize, e: &MapEntry, set: Validity) {
        let bpc = self.shared.layout.blocks_per_cluster();
        let g = self.shared.layout.grain();
        for (b, n, src) in runs(set, bpc, |b| e.source(b)) {
            match src {
                Some(c) => self.submit_bounce(i, Dir::Read, At::new(c, b * g, n * g)),
                None => {
                    let op = self.ops.get_mut(i).expect("op");
                    let bounce = op.bounce.as_mut().expect("bounce").as_mut_slice();
                    bounce[(b * g) as usize..((b + n) * g) as usize].fill(0);
                }
            }
        }
    }

    /// Write the runs of `write_set` from the bounce buffer to the target cluster.
    fn write_bounce_runs(&mut self, i: usize) {
        let (set, target) = {
            let op = self.ops.get(i).expect("op");
            (op.write_set, op.target)
        };
        let bpc = self.shared.layout.blocks_per_cluster();
        let g = self.shared.layout.grain();
        for (b, n, ()) in runs(set, bpc, |_| ()) {
            self.submit_bounce(i, Dir::Write { fua: false }, At::new(target, b * g, n * g));
        }
    }

    fn op_discard(&mut self, i: usize) {
        if !self.acquire(i, true) {
            return;
        }
        let Some((e, snap)) = self.entry_of(i) else {
            return self.finish_op(i, Err(IoError::UnknownVolume));
        };
        let cs = self.shared.layout.cluster_size as u32;
        let (coff, clen, kind) = {
            let op = self.ops.get(i).expect("op");
            (op.coff, op.clen, op.kind)
        };
        if !e.is_allocated() {
            return self.set_entry_and_finish(i, e, e);
        }
        let owned = e.born > snap;
        if coff == 0 && clen == cs {
            self.ops.get_mut(i).expect("op").drops = [e.phys, e.parent];
            return self.set_entry_and_finish(i, e, MapEntry::UNALLOCATED);
        }
        let g = self.shared.layout.grain();
        let first_full = coff.div_ceil(g);
        let end_full = (coff + clen) / g;
        let aligned = coff % g == 0 && clen % g == 0;
        if owned && end_full > first_full && (aligned || matches!(kind, Op::Trim)) {
            // Metadata only: the covered blocks read as zeros from now on.
            let r = Validity::range(first_full, end_full - first_full);
            let mut ne = MapEntry {
                valid: e.valid.minus(r),
                pvalid: e.pvalid.minus(r),
                ..e
            };
            if ne.pvalid.is_empty() && ne.parent != NONE {
                ne.parent = NONE;
                self.ops.get_mut(i).expect("op").drops[1] = e.parent;
            }
            if ne.valid.is_empty() && ne.pvalid.is_empty() {
                ne = MapEntry::UNALLOCATED;
                self.ops.get_mut(i).expect("op").drops = [e.phys, e.parent];
            }
            return self.set_entry_and_finish(i, e, ne);
        }
        if matches!(kind, Op::Trim) {
            // Trimming part of a shared cluster is only advice: nothing to do.
            return self.finish_op(i, Ok(()));
        }
        // Part of a cluster must read as zeros: write zeros through the write path.
        self.ops.get_mut(i).expect("op").zeros = true;
        self.op_write(i);
    }

    fn set_entry_and_finish(&mut self, i: usize, old: MapEntry, ne: MapEntry) {
        if ne != old {
            self.apply_entry(i, ne);
        }
        let fua = matches!(
            self.ops.get(i).map(|o| o.kind),
            Some(Op::WriteZeroes { fua: true })
        );
        if fua {
            return self.finish_fua(i, true);
        }
        self.finish_op(i, Ok(()))
    }

    /// A FUA operation's I/O is done. It is acknowledged once its data and every map record
    /// before it are durable: even with no record of its own, it may depend on one still
    /// pending (a write that allocated the cluster, a trim that unmapped it). `synced`: its
    /// data, if any, went out with RWF_DSYNC; otherwise the commit's device sync covers it.
    fn finish_fua(&mut self, i: usize, synced: bool) {
        if synced && !self.journal.has_pending() && !self.commit.in_flight {
            return self.finish_op(i, Ok(()));
        }
        self.ops.get_mut(i).expect("op").stage = Stage::Durable;
        self.commit_wanted(Some(Waiter::Op(i)))
    }

    fn apply_entry(&mut self, i: usize, ne: MapEntry) {
        let (vol, shard, idx, drops) = {
            let op = self.ops.get_mut(i).expect("op");
            let d = op.drops;
            op.drops = [NONE; 2];
            (op.vol, op.shard, op.idx, d)
        };
        let Some(v) = self.vols.get_mut(&vol) else {
            return;
        };
        let snap = v.snap_epoch;
        let Some(s) = v.shards.get_mut(&shard) else {
            return;
        };
        s.map.set(idx as usize, ne);
        self.journal.append(&crate::journal::Record::Entry {
            vol,
            shard: shard as u32,
            index: idx,
            entry: ne,
        });
        for c in drops {
            if c != ne.phys && c != ne.parent {
                self.release_ref(shard, idx, c);
            }
        }
        if ne.parent != NONE && ne.born > snap {
            self.fills.push_back((vol, shard, idx));
        }
    }

    /// The operation's bytes in the caller's buffer (4 KiB aligned itself) start on a
    /// device sector boundary, as O_DIRECT needs of memory too.
    fn buf_aligned(&self, i: usize) -> bool {
        self.ops
            .get(i)
            .expect("op")
            .buf_off
            .is_multiple_of(self.sector as usize)
    }

    /// Device I/O between a cluster and the caller's buffer.
    fn submit_data(&mut self, i: usize, dir: Dir, at: At, buf_off: usize) {
        let ptr = self.ops.get(i).expect("op").parent().ptr(buf_off);
        // SAFETY: bytes buf_off..buf_off + len of the caller's buffer belong to this
        // operation, and the request (held by the operation) lives until it completes.
        unsafe { self.submit_dev(i, dir, at, ptr) };
    }

    /// Device I/O between a cluster and the operation's bounce buffer.
    fn submit_bounce(&mut self, i: usize, dir: Dir, at: At) {
        let op = self.ops.get_mut(i).expect("op");
        let ptr = op.bounce.as_mut().expect("bounce").as_mut_ptr();
        // SAFETY: the bounce buffer holds the whole cluster and coff + len lies inside it;
        // the operation owns it until the operation finishes, after its I/O completed.
        unsafe { self.submit_dev(i, dir, at, ptr.add(at.coff as usize)) };
    }

    /// # Safety
    /// `ptr..ptr + at.len` lies in a buffer this operation owns until the I/O completes.
    unsafe fn submit_dev(&mut self, i: usize, dir: Dir, at: At, ptr: *mut u8) {
        let (member, pos) = self.shared.layout.locate(at.cluster, at.coff as u64);
        self.ops.get_mut(i).expect("op").pending += 1;
        let len = at.len;
        let op = match dir {
            Dir::Read => DevOp::Read {
                member,
                pos,
                buf: ptr,
                len,
            },
            Dir::Write { fua } => DevOp::Write {
                member,
                pos,
                buf: ptr,
                len,
                fua,
            },
        };
        // SAFETY: the caller's contract.
        unsafe { self.push_dev([(op, Cont::Data { op: i, len })]) };
    }

    /// A device read or write finished.
    pub(crate) fn on_data(&mut self, i: usize, res: i32, len: u32) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        op.pending -= 1;
        if res < 0 {
            op.err.get_or_insert(IoError::Device(-res));
        } else if res as u32 != len {
            op.err.get_or_insert(IoError::Device(libc::EIO));
        }
        self.maybe_advance(i);
    }

    pub(crate) fn maybe_advance(&mut self, i: usize) {
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        if op.pending > 0 {
            return;
        }
        match op.stage {
            Stage::Read => {
                let r = op.err.clone().map_or(Ok(()), Err);
                if let (Ok(()), Some(bounce)) = (&r, &op.bounce) {
                    let (coff, clen) = (op.coff as usize, op.clen as usize);
                    let parent = op.parent.as_deref().expect("request");
                    // SAFETY: the caller's bytes of this operation, written by it alone.
                    unsafe { parent.slice(op.buf_off, clen) }
                        .copy_from_slice(&bounce.as_slice()[coff..coff + clen]);
                }
                self.finish_op(i, r)
            }
            Stage::RmwRead => {
                if let Some(e) = op.err.clone() {
                    return self.fail_write(i, e);
                }
                let (coff, clen, zeros, buf_off) = (op.coff, op.clen, op.zeros, op.buf_off);
                let bounce = op.bounce.as_mut().expect("bounce");
                let dst = &mut bounce.as_mut_slice()[coff as usize..(coff + clen) as usize];
                if op.job != Job::None {
                    // Jobs copy what they read; there are no caller bytes.
                } else if zeros {
                    dst.fill(0);
                } else {
                    let parent = op.parent.as_deref().expect("request");
                    // SAFETY: the caller's bytes of this operation, read-only here.
                    dst.copy_from_slice(unsafe { parent.slice(buf_off, clen as usize) });
                }
                op.stage = Stage::Write;
                self.write_bounce_runs(i);
                self.maybe_advance(i)
            }
            Stage::Write => {
                if let Some(e) = op.err.clone() {
                    return self.fail_write(i, e);
                }
                let fua = matches!(
                    op.kind,
                    Op::Write { fua: true } | Op::WriteZeroes { fua: true }
                );
                // Only the in-place path (no new entry) wrote with RWF_DSYNC.
                let synced = op.new_entry.is_none();
                let base = op.base.as_deref().copied();
                if let Some(ne) = op.new_entry {
                    let Some((old, _)) = self.entry_of(i) else {
                        return self.finish_op(i, Err(IoError::UnknownVolume));
                    };
                    if base.is_some_and(|b| b != old) {
                        // A job computed from an entry that changed under it (a rollback
                        // swapped the map): its copy is stale, drop it.
                        return self.fail_write(i, IoError::Device(libc::ESTALE));
                    }
                    if ne != old {
                        self.apply_entry(i, ne);
                    }
                }
                if fua {
                    return self.finish_fua(i, synced);
                }
                self.finish_op(i, Ok(()))
            }
            Stage::Start | Stage::Durable => {}
        }
    }

    fn fail_write(&mut self, i: usize, e: IoError) {
        let op = self.ops.get(i).expect("op");
        if op.fresh {
            // Nothing points to it yet: free at once, also when its group was given to
            // another reactor while the write flew (then its owner marks it reusable).
            let c = op.target;
            self.shared.used_clusters.fetch_sub(1, Ordering::Relaxed);
            if !self.alloc.release_now(c) {
                self.send_free(c);
            }
        }
        self.finish_op(i, Err(e))
    }

    /// The operation is over: release its lock and finish its part of the request.
    pub(crate) fn finish_op(&mut self, i: usize, r: Result<(), IoError>) {
        self.release(i);
        let Some(op) = self.ops.get_mut(i) else {
            return;
        };
        let (job, vol, kind) = (op.job, op.vol, op.kind);
        let parent = op.parent.take().expect("an operation finishes once");
        if let Some(b) = op.bounce.take() {
            // No I/O of the operation is in flight any more: the buffer is free.
            self.bounces.put(b);
        }
        // Dropped in place: a cluster operation is too large to move out cheaply.
        self.ops.discard(i);
        if self.reply(&parent, r) && job == Job::None {
            let now = *self.done_clock.get_or_insert_with(std::time::Instant::now);
            let lat = now.saturating_duration_since(parent.started);
            self.shared.stats[self.id].record_latency(lat);
        }
        self.parents.put(parent);
        if job != Job::None {
            self.jobs_in_flight -= 1;
        }
        if let Some(v) = self.vols.get_mut(&vol) {
            v.inflight -= 1;
            if kind.is_write() && job == Job::None {
                v.writes_inflight -= 1;
            }
            let drained = match &v.hold {
                Some(h) if h.all => v.inflight == 0,
                Some(_) => v.writes_inflight == 0,
                None => false,
            };
            if drained {
                self.hold_drained(vol);
            }
            if let Some(v) = self.vols.get(&vol) {
                if v.deleting && v.inflight == 0 {
                    self.drop_image(vol);
                }
            }
        }
    }

    /// Mark free a cluster of a group this reactor does not own (any more): its owner does.
    fn send_free(&mut self, c: u64) {
        let g = (c / self.shared.group_size) as usize;
        let to = self.shared.group_owner[g].load(Ordering::Acquire) as usize;
        self.send(to, Msg::Free(vec![c]));
    }

    pub(crate) fn alloc_cluster(&mut self) -> Option<u64> {
        let c = self.alloc.alloc()?;
        self.shared.used_clusters.fetch_add(1, Ordering::Relaxed);
        Some(c)
    }

    /// A cluster is no longer referenced: reusable once the record saying so is durable.
    pub(crate) fn free_cluster(&mut self, c: u64) {
        self.alloc.free_later(c);
    }

    pub(crate) fn wait_space(&mut self, i: usize) {
        self.ops.get_mut(i).expect("op").stage = Stage::Start;
        self.space_waiters.push_back(i);
        if self.alloc.has_frees() {
            // Frees are on their way: the commit makes them reusable.
            self.commit_wanted(None);
            return;
        }
        if self.asking.is_none() {
            let n = self.shared.inboxes.len();
            let to = (self.id + 1) % n;
            if to == self.id {
                return self.fail_space_waiters();
            }
            self.asking = Some(to);
            self.send(to, Msg::GroupAsk { from: self.id });
        }
    }

    fn fail_space_waiters(&mut self) {
        for w in std::mem::take(&mut self.space_waiters) {
            self.finish_op(w, Err(IoError::NoSpace));
        }
    }

    pub(crate) fn retry_space_waiters(&mut self) {
        let ws: Vec<usize> = self.space_waiters.drain(..).collect();
        self.ready.extend(ws);
    }

    /// Answer reactor `to`'s group request with `group` (None: none to spare). The group is
    /// `to`'s from now on: frees of its clusters this reactor sends after it reach `to`
    /// after it (one sent from elsewhere before it arrives goes round, see `Msg::Free`).
    pub(crate) fn give_group(&mut self, to: usize, group: Option<crate::alloc::AllocGroup>) {
        if let Some(g) = &group {
            self.shared.group_owner[g.index as usize].store(to as u32, Ordering::Release);
        }
        self.send(
            to,
            Msg::GroupGive {
                group,
                from: self.id,
            },
        );
    }

    /// Answer to a group request.
    pub(crate) fn on_group(&mut self, group: Option<crate::alloc::AllocGroup>, from: usize) {
        if let Some(g) = group {
            tracing::debug!(
                core = self.id,
                group = g.index,
                free = g.free(),
                "borrowed an allocation group"
            );
            self.alloc.groups.push(g);
            self.asking = None;
            self.fresh_group = true;
            return self.retry_space_waiters();
        }
        let n = self.shared.inboxes.len();
        let next = (from + 1) % n;
        if next == self.id {
            self.asking = None;
            return self.fail_space_waiters();
        }
        self.asking = Some(next);
        self.send(next, Msg::GroupAsk { from: self.id });
    }

    /// Publish how full this reactor's journal ring is (percent of it recovery still needs),
    /// for control operations deciding whether to checkpoint first; returns it.
    pub(crate) fn publish_journal_fill(&self) -> u64 {
        let fill = self.journal.used_blocks() * 100 / self.journal.blocks.max(1);
        self.shared.journal_fill[self.id].store(fill as u32, Ordering::Relaxed);
        fill
    }

    /// Ask for a commit; `w` completes once it is durable.
    pub(crate) fn commit_wanted(&mut self, w: Option<Waiter>) {
        if let Some(w) = w {
            self.commit.waiting.push(w);
        }
        self.commit.wanted = true;
    }

    /// Start a group commit if one is wanted and none is in flight: sync data on every
    /// member, then write the journal blocks, then sync member 0 (linked in that order).
    pub(crate) fn maybe_commit(&mut self) {
        if self.commit.in_flight || !self.commit.wanted {
            return;
        }
        self.commit.wanted = false;
        self.commit.in_flight = true;
        self.commit.riding = std::mem::take(&mut self.commit.waiting);
        self.commit.error = None;
        self.mark_commit_time();
        let jw = self.journal.take_commit(&mut self.commit.buf);
        // Frees ride only a commit that writes every record so far: one cut short (ring
        // full, or at its end) leaves records, maybe the ones that free them, for later.
        if !self.journal.commit_was_cut() {
            self.alloc.commit_started();
        }
        if self.publish_journal_fill() > 50 {
            self.shared.want_checkpoint.store(true, Ordering::Release);
        }
        let members = self.shared.members.len();
        let steps = members as u32 + if jw.is_some() { 2 } else { 0 };
        self.commit.steps = steps;
        // One linked chain: the data of every member durable, then the journal blocks
        // written, then durable. A step after a failed one is cancelled.
        let flush = |member| (DevOp::Flush { member }, Cont::Commit { len: 0 });
        let flushes = (0..members).map(flush);
        match jw {
            Some((pos, _)) => {
                let buf = self.commit.buf.as_ref().expect("commit buffer");
                let len = buf.len() as u32;
                let write = DevOp::Write {
                    member: 0,
                    pos,
                    buf: buf.as_ptr(),
                    len,
                    fua: false,
                };
                let chain = flushes.chain([(write, Cont::Commit { len }), flush(0)]);
                // SAFETY: the commit's buffer is given back to the journal only once the
                // chain's last step completed (`on_commit_step`).
                unsafe { self.push_dev(chain) };
            }
            // SAFETY: flushes point to no buffer.
            None => unsafe { self.push_dev(flushes) },
        }
    }

    /// One step of the commit chain completed with `res`; `len`: the bytes a journal write
    /// step had to write (0 for a sync).
    pub(crate) fn on_commit_step(&mut self, res: i32, len: u32) {
        // A short journal write (a file whose filesystem ran full midway) is a failure: the
        // blocks past its end are missing. io_uring cancels the rest of the chain then.
        let res = if res >= 0 && (res as u32) < len {
            -libc::ENOSPC
        } else {
            res
        };
        // The first error says why; the cancellations it causes down the chain do not.
        if res < 0 && self.commit.error.is_none_or(|e| e == libc::ECANCELED) {
            self.commit.error = Some(-res);
        }
        self.commit.steps -= 1;
        if self.commit.steps > 0 {
            return;
        }
        self.commit.in_flight = false;
        let riding = std::mem::take(&mut self.commit.riding);
        if let Some(err) = self.commit.error {
            // The blocks are written again by the next commit, at the same place: every
            // later commit writes them first, so none is acknowledged while recovery could
            // not reach it. Frees stay pending with them. Retried every 50 ms while records
            // wait (see `pass`); logged once per run of failures.
            self.journal.commit_failed(&mut self.commit.buf);
            self.commit.failures += 1;
            if self.commit.failures == 1 {
                tracing::error!(
                    core = self.id,
                    errno = err,
                    "journal commit failed; retrying, flushes fail until a commit succeeds"
                );
            }
            for w in riding {
                self.finish_waiter(w, Err(IoError::Device(err)));
            }
            return;
        }
        if self.commit.failures > 0 {
            tracing::warn!(
                core = self.id,
                failures = self.commit.failures,
                "journal commit succeeded again after failures"
            );
            self.commit.failures = 0;
        }
        self.journal.commit_done();
        if !self.journal.commit_was_cut() {
            // Every cluster this commit frees is free from now on, also one of a group
            // another reactor owns: the pool stops counting it here, before any waiter of
            // the commit (a flush) is answered, and its owner only marks it reusable
            // (`Msg::Free`). A cut commit frees nothing: the frees ride the uncut one that
            // writes their records (after a failed commit they may still be waiting).
            let (released, foreign) = self.alloc.commit_done();
            self.shared
                .used_clusters
                .fetch_sub(released + foreign.len() as u64, Ordering::Relaxed);
            for c in foreign {
                self.send_free(c);
            }
        }
        if self.journal.commit_was_cut() {
            // The ring was full: these records wait for a checkpoint to make room. Records
            // appended while the commit flew ride the next one with their own waiters.
            self.shared.want_checkpoint.store(true, Ordering::Release);
            self.commit.waiting.extend(riding);
            self.commit.wanted = true;
        } else {
            for w in riding {
                self.finish_waiter(w, Ok(()));
            }
        }
        self.retry_space_waiters();
    }

    fn finish_waiter(&mut self, w: Waiter, r: Result<(), IoError>) {
        match w {
            Waiter::Op(i) => self.finish_op(i, r),
            Waiter::Flush(p) => {
                if self.reply(&p, r) {
                    self.shared.stats[self.id].record_latency(p.started.elapsed());
                }
            }
            Waiter::Call(f) => f(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{ReplyTo, Sink};
    use std::time::Instant;

    #[test]
    fn a_failed_write_frees_its_cluster_at_once_after_its_group_moved() {
        let e = crate::engine::mem_engine(2);
        let used = e.pool_info().used_bytes;
        let (tx, rx) = std::sync::mpsc::channel();
        e.inner.shared.send_blocking(
            0,
            Msg::Task(Box::new(move |r: &mut Reactor| {
                // A write allocates a cluster on reactor 0...
                let c = r.alloc_cluster().expect("a free cluster");
                let write = Op::Write { fua: false };
                let reply = ReplyTo::Sink(Sink::for_thread());
                let parent = Parent::new(1, write, 0, 4096, None, reply, 0, 1, Instant::now());
                let span = Span {
                    vol: u64::MAX,
                    shard: 0,
                    idx: 0,
                    coff: 0,
                    clen: 4096,
                    buf_off: 0,
                    vol_off: 0,
                };
                let i = r.ops.insert(ClusterOp::new(parent, write, Job::None, span));
                let op = r.ops.get_mut(i).expect("op");
                (op.target, op.fresh, op.stage) = (c, true, Stage::Write);
                // ... reactor 1 is given the cluster's group while the write is in flight...
                let k = r
                    .alloc
                    .groups
                    .iter()
                    .position(|g| g.holds(c))
                    .expect("group");
                let g = r.alloc.groups.swap_remove(k);
                let free = g.free();
                r.give_group(1, Some(g));
                // ... and the device fails the write.
                r.fail_write(i, IoError::Device(libc::EIO));
                tx.send((c, free)).expect("test waits");
            })),
        );
        let (c, free) = rx.recv().expect("task ran");
        assert_eq!(e.pool_info().used_bytes, used, "counted free at once");
        // Reactor 1 got the group, then the cluster back (both sent by reactor 0, in order).
        let free_now =
            e.on_all(move |r| r.alloc.groups.iter().find(|g| g.holds(c)).map(|g| g.free()));
        assert_eq!(free_now, vec![None, Some(free + 1)]);
        e.shutdown().expect("shutdown");
    }

    #[test]
    fn runs_split_on_gaps_and_on_key_changes() {
        let set = Validity::range(0, 3).or(Validity::range(5, 4));
        let r: Vec<_> = runs(set, 16, |b| b < 7).collect();
        assert_eq!(r, vec![(0, 3, true), (5, 2, true), (7, 2, false)]);
        assert!(runs(Validity::default(), 16, |_| ()).next().is_none());
    }
}
