//! Aligned I/O buffers: O_DIRECT alignment is a property of the type, not a comment.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;

/// Alignment of every I/O buffer (and the unit of validity tracking inside a pool).
pub const BUF_ALIGN: usize = 4096;

/// A heap buffer whose start is 4 KiB aligned and whose capacity is a multiple of 4 KiB,
/// so any 512-byte aligned window of it is valid for O_DIRECT.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes (capacity rounded up to 4 KiB).
    pub fn zeroed(len: usize) -> AlignedBuf {
        let cap = len.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN;
        let layout = Layout::from_size_align(cap, BUF_ALIGN).expect("buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut b = AlignedBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        b
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity in bytes (a multiple of 4 KiB).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Change the length within the capacity; new bytes are whatever the buffer held.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "AlignedBuf::set_len beyond capacity");
        self.len = len;
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer to the first byte (4 KiB aligned).
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer to the first byte (4 KiB aligned).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, BUF_ALIGN).expect("buffer layout");
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::from_slice(self.as_slice())
    }
}

/// Buffers kept for reuse, up to a byte budget: an engine operation's bounce buffer or a
/// target connection's request buffer comes from here rather than from a fresh zeroed
/// allocation (allocating and zeroing 64 KiB per read-modify-write was most of the
/// reactor's time after a snapshot). A reused buffer holds whatever its last user left in
/// it: its next user must write every byte it later reads (DESIGN.md section 3,
/// read-modify-write).
pub struct BufPool {
    bufs: Vec<AlignedBuf>,
    budget: usize,
    max_capacity: usize,
}

impl Default for BufPool {
    /// A pool of a reactor's queue depth of 64 KiB clusters.
    fn default() -> BufPool {
        BufPool::new(4 << 20, usize::MAX)
    }
}

impl BufPool {
    /// A pool keeping about `budget` bytes (at least four buffers), of buffers no larger
    /// than `max_capacity` bytes.
    pub fn new(budget: usize, max_capacity: usize) -> BufPool {
        BufPool {
            bufs: Vec::new(),
            budget,
            max_capacity,
        }
    }

    /// A buffer of `len` bytes: a kept one (contents unspecified) or a fresh zeroed one.
    pub fn take(&mut self, len: usize) -> AlignedBuf {
        match self.bufs.pop() {
            Some(mut b) if b.capacity() >= len => {
                b.set_len(len);
                b
            }
            other => {
                // Too small for this request: kept for a later one.
                self.bufs.extend(other);
                AlignedBuf::zeroed(len)
            }
        }
    }

    /// Keep `b` for reuse if it is small enough and the budget allows; drop it otherwise.
    pub fn put(&mut self, b: AlignedBuf) {
        let keep = (self.budget / b.capacity().max(1)).max(4);
        if b.capacity() <= self.max_capacity && self.bufs.len() < keep {
            self.bufs.push(b);
        }
    }

    /// Buffers kept now.
    pub fn len(&self) -> usize {
        self.bufs.len()
    }

    /// True when no buffer is kept.
    pub fn is_empty(&self) -> bool {
        self.bufs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_4k_aligned_and_zeroed() {
        for len in [1usize, 512, 4096, 4097, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert_eq!(b.capacity() % BUF_ALIGN, 0);
            assert!(b.as_slice().iter().all(|&x| x == 0));
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn pool_reuses_buffers_up_to_its_budget() {
        let mut pool = BufPool::default();
        let mut b = pool.take(65536);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice()[0] = 7;
        let p = b.as_ptr();
        pool.put(b);
        // The same allocation comes back, with what its last user left in it.
        let b = pool.take(65536);
        assert_eq!(b.as_ptr(), p);
        assert_eq!(b.as_slice()[0], 7);
        assert_eq!(b.len(), 65536);
        let big: Vec<AlignedBuf> = (0..100).map(|_| pool.take(65536)).collect();
        for x in big {
            pool.put(x);
        }
        assert_eq!(pool.len(), (4 << 20) / 65536);
    }
}
