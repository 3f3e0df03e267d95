//! The backend of synchronous media: each operation runs on the reactor's thread as it is
//! pushed, and its completion waits in a queue for the next reap, as a CQE would.

use super::{Backend, DevOp};
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;

/// A medium read and written synchronously: the in-memory disk, the null device, or a file
/// in a pool that io_uring cannot serve whole.
pub(crate) trait Medium: Send + Sync {
    /// Fill `out` from byte `pos`.
    fn read_at(&self, pos: u64, out: &mut [u8]) -> io::Result<()>;
    /// Write `data` at byte `pos`.
    fn write_at(&self, pos: u64, data: &[u8]) -> io::Result<()>;
    /// Make completed writes durable.
    fn flush(&self) -> io::Result<()>;
}

/// Runs device operations on `media` (indexed by member) inline.
pub(crate) struct Inline {
    media: Vec<Arc<dyn Medium>>,
    done: VecDeque<(u64, i32)>,
}

impl Inline {
    pub(crate) fn new(media: Vec<Arc<dyn Medium>>) -> Inline {
        Inline {
            media,
            done: VecDeque::new(),
        }
    }

    /// True when no completion waits to be reaped.
    pub(crate) fn is_idle(&self) -> bool {
        self.done.is_empty()
    }

    /// Run one operation.
    ///
    /// # Safety
    /// As `Backend::push`: the operation's buffer is valid for its length and not touched
    /// by anyone else meanwhile.
    unsafe fn run(&self, op: DevOp) -> i32 {
        let r = match op {
            DevOp::Read {
                member,
                pos,
                buf,
                len,
            } => {
                // SAFETY: the caller's contract (see above).
                let out = unsafe { std::slice::from_raw_parts_mut(buf, len as usize) };
                self.media[member].read_at(pos, out)
            }
            DevOp::Write {
                member,
                pos,
                buf,
                len,
                fua,
            } => {
                // SAFETY: the caller's contract (see above).
                let data = unsafe { std::slice::from_raw_parts(buf, len as usize) };
                let m = &self.media[member];
                m.write_at(pos, data)
                    .and_then(|()| if fua { m.flush() } else { Ok(()) })
            }
            DevOp::Flush { member } => self.media[member].flush(),
        };
        r.map_or_else(
            |e| -e.raw_os_error().unwrap_or(libc::EIO),
            |()| op.full_result(),
        )
    }
}

impl Backend for Inline {
    unsafe fn push(&mut self, chain: &[(DevOp, u64)]) {
        let mut failed = false;
        for &(op, user_data) in chain {
            let res = if failed {
                -libc::ECANCELED
            } else {
                // SAFETY: `push`'s contract covers every operation of the chain.
                unsafe { self.run(op) }
            };
            failed |= res < 0;
            self.done.push_back((user_data, res));
        }
    }

    fn queued(&self) -> usize {
        0
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.done.drain(..));
    }

    fn runs_inline(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{Fault, FaultOp, MemDisk};

    fn backend(disk: &Arc<MemDisk>) -> Inline {
        Inline::new(vec![disk.clone() as Arc<dyn Medium>])
    }

    #[test]
    fn reads_writes_and_flushes_complete_at_the_next_reap_with_their_user_data() {
        let disk = MemDisk::new(1 << 20, true);
        let mut b = backend(&disk);
        let data = crate::buf::AlignedBuf::from_slice(&[7u8; 4096]);
        let mut back = crate::buf::AlignedBuf::zeroed(4096);
        let w = DevOp::Write {
            member: 0,
            pos: 8192,
            buf: data.as_ptr(),
            len: 4096,
            fua: false,
        };
        let r = DevOp::Read {
            member: 0,
            pos: 8192,
            buf: back.as_mut_ptr(),
            len: 4096,
        };
        // SAFETY: both buffers outlive the reap below and are not touched until then.
        unsafe { b.push(&[(w, 1), (DevOp::Flush { member: 0 }, 2), (r, 3)]) };
        let mut out = Vec::new();
        b.reap(&mut out);
        assert_eq!(out, [(1, 4096), (2, 0), (3, 4096)]);
        assert!(back.as_slice().iter().all(|&x| x == 7));
        assert!(b.is_idle());
        // Flushed: a power cut keeps the write.
        let mut after = [0u8; 4096];
        disk.crash(1).read(8192, &mut after);
        assert!(after.iter().all(|&x| x == 7));
    }

    #[test]
    fn a_failed_step_cancels_the_rest_of_its_chain_only() {
        let disk = MemDisk::new(1 << 20, true);
        disk.inject(Fault::always(FaultOp::Flush, 0..0, libc::EIO));
        let mut b = backend(&disk);
        let data = crate::buf::AlignedBuf::from_slice(&[9u8; 4096]);
        let w = DevOp::Write {
            member: 0,
            pos: 0,
            buf: data.as_ptr(),
            len: 4096,
            fua: false,
        };
        // SAFETY: the buffer outlives the reap below.
        unsafe {
            b.push(&[
                (DevOp::Flush { member: 0 }, 1),
                (w, 2),
                (DevOp::Flush { member: 0 }, 3),
            ]);
            b.push(&[(w, 4)]);
        }
        let mut out = Vec::new();
        b.reap(&mut out);
        assert_eq!(
            out,
            [
                (1, -libc::EIO),
                (2, -libc::ECANCELED),
                (3, -libc::ECANCELED),
                (4, 4096)
            ]
        );
    }

    #[test]
    fn a_fua_write_is_durable_when_it_completes() {
        let disk = MemDisk::new(1 << 20, true);
        let mut b = backend(&disk);
        let data = crate::buf::AlignedBuf::from_slice(&[3u8; 4096]);
        let w = DevOp::Write {
            member: 0,
            pos: 4096,
            buf: data.as_ptr(),
            len: 4096,
            fua: true,
        };
        // SAFETY: the buffer outlives the reap below.
        unsafe { b.push(&[(w, 1)]) };
        let mut out = Vec::new();
        b.reap(&mut out);
        assert_eq!(out, [(1, 4096)]);
        let mut after = [0u8; 4096];
        disk.crash(5).read(4096, &mut after);
        assert!(after.iter().all(|&x| x == 3));
    }
}
