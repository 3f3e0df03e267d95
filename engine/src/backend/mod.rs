//! Device I/O behind one small trait, whatever the media (cloud-hypervisor's `AsyncIo`,
//! Firecracker's `FileEngine`): a reactor pushes chains of `DevOp`s, each with the user data
//! its completion carries, and reaps `(user_data, result)` pairs. Files and block devices go
//! through the reactor's io_uring (`uring::Ring`); the in-memory disk (with its crash
//! simulator) and the null device run each operation at once on the reactor's thread
//! (`inline::Inline`).

pub(crate) mod inline;
pub(crate) mod uring;

use std::io;

/// One device operation on pool member `member` (its index in the pool), at byte `pos`.
/// Buffers are raw: they belong to state the reactor keeps until the completion is reaped
/// (see `Backend::push`).
#[derive(Clone, Copy, Debug)]
pub(crate) enum DevOp {
    /// Read `len` bytes into `buf`.
    Read {
        member: usize,
        pos: u64,
        buf: *mut u8,
        len: u32,
    },
    /// Write `len` bytes from `buf`; with `fua`, durable before it completes (RWF_DSYNC).
    Write {
        member: usize,
        pos: u64,
        buf: *const u8,
        len: u32,
        fua: bool,
    },
    /// Make the member's completed writes durable (fdatasync).
    Flush { member: usize },
}

// SAFETY: a `DevOp` is plain data; whoever pushes it answers for its buffer
// (`Backend::push`'s contract), on whatever thread the reactor runs.
unsafe impl Send for DevOp {}

impl DevOp {
    /// The result of the operation when it fully succeeds: the bytes it moves.
    pub(crate) fn full_result(&self) -> i32 {
        match *self {
            DevOp::Read { len, .. } | DevOp::Write { len, .. } => len as i32,
            DevOp::Flush { .. } => 0,
        }
    }
}

/// Where a reactor's device operations go.
pub(crate) trait Backend {
    /// Queue `chain`: each operation starts once the one before it succeeded, and after a
    /// failure (or a short transfer) the rest complete with `-ECANCELED`, as in an io_uring
    /// link chain. Each completes through `reap` with its user data and its result: the
    /// bytes moved, or `-errno`. Never blocks and never spins: what the device cannot take
    /// now waits in the backend for a later `submit`.
    ///
    /// # Safety
    /// Every buffer of `chain` is valid for its length, and nothing else reads (for a
    /// `Read`) or writes it until its completion has been reaped.
    unsafe fn push(&mut self, chain: &[(DevOp, u64)]);

    /// Operations pushed and not yet handed to the device.
    fn queued(&self) -> usize;

    /// Hand the queued operations to the device. An error is returned, not retried: what
    /// could not go stays queued for the next call.
    fn submit(&mut self) -> io::Result<()>;

    /// Move the completions that arrived to `out`.
    fn reap(&mut self, out: &mut Vec<(u64, i32)>);

    /// True when operations run during `push`, on the reactor's thread (the reactor then
    /// commits its journal in smaller steps, each a pause of all its I/O).
    fn runs_inline(&self) -> bool;
}
