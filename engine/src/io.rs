//! The request API every front end (NBD, iSCSI, tessel-bench, tests) speaks to the engine.

use crate::buf::AlignedBuf;
use crate::error::IoError;

/// Identifies a volume (or a snapshot opened read-only) for I/O; never reused in a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u64);

/// What a request asks the engine to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the request's buffer.
    Read,
    /// Write the request's buffer at `offset`; with `fua`, durable before completion.
    Write { fua: bool },
    /// Make every write completed before this request durable.
    Flush,
    /// Discard the range: it reads back as zeros (or, for a clone, unchanged is never exposed).
    Trim,
    /// Make the range read as zeros; with `fua`, durable before completion.
    WriteZeroes { fua: bool },
    /// Report which parts of the range are allocated (see `Completion::extents`).
    BlockStatus,
}

impl Op {
    /// True for operations that change the volume's contents.
    pub fn is_write(self) -> bool {
        matches!(self, Op::Write { .. } | Op::Trim | Op::WriteZeroes { .. })
    }
}

/// One I/O request against a volume. Offsets and lengths are in bytes; those of reads and
/// block status must be multiples of the volume's exported block size (512 or 4096), those
/// of writes, trims and write-zeroes may be any (partial grains are read, merged and
/// written whole under the cluster's exclusive lock: atomic against every other request).
#[derive(Debug)]
pub struct Request {
    /// Caller's tag, returned unchanged in the completion.
    pub tag: u64,
    /// The volume (or read-only snapshot) addressed.
    pub volume: VolumeId,
    /// The operation.
    pub op: Op,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Data buffer: required (and exactly `len` long) for Read and Write, absent otherwise.
    pub buf: Option<AlignedBuf>,
}

/// A run of blocks with one allocation state, answered to `Op::BlockStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset in the volume.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// True when the run is backed by allocated clusters (it may still read as data).
    pub allocated: bool,
}

/// The answer to one `Request`.
#[derive(Debug)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Success, or why the request failed.
    pub result: Result<(), IoError>,
    /// The request's buffer, handed back (filled, for reads).
    pub buf: Option<AlignedBuf>,
    /// For `Op::BlockStatus`: the extents covering the requested range, in order.
    pub extents: Vec<Extent>,
}
