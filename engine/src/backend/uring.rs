//! The reactor's io_uring (Firecracker's io_uring/mod.rs shape): set up and registered in
//! one constructor, one push that keeps the completion queue from overflowing, one submit,
//! one reap. Device operations address the pool's members as registered files; the reactor's
//! own entries (its doorbell's read, its pollers' readiness polls, their cancellations) go
//! through the same ring, so that one `io_uring_enter` sleeps on all of them.

use super::{Backend, DevOp};
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

/// A reactor's ring.
pub(crate) struct Ring {
    ring: IoUring,
    /// Entries in the submission queue or the kernel whose completion is not reaped yet:
    /// never more than the completion queue holds, so that it cannot overflow.
    in_flight: usize,
    cq_entries: usize,
    /// Chains that found no room (submission queue full, or the completion queue's
    /// capacity taken), in push order; `submit` moves them to the ring as room appears.
    waiting: VecDeque<Vec<squeue::Entry>>,
    waiting_entries: usize,
    /// Reused by `push` to build a chain's entries without allocating each time.
    scratch: Vec<squeue::Entry>,
    /// Set up with deferred task work and disabled: `enable` on the issuing thread.
    deferred: bool,
    /// The pool's members are registered files (device operations allowed).
    files: bool,
}

impl Ring {
    /// Set up a ring of `entries` submission entries and register `files` (the pool's
    /// members, indexed as `DevOp::member`; empty when the media are not files).
    ///
    /// Completions as fio sets up its rings: deferred task work run by the reactor's own
    /// enters (no interrupting signal while it spins), one issuer. Kernels before 6.1
    /// refuse the flags and get a plain ring.
    pub(crate) fn new(entries: u32, files: &[RawFd]) -> io::Result<Ring> {
        let entries = entries.max(8);
        let (ring, deferred) = match IoUring::builder()
            .setup_r_disabled()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(_) => (IoUring::builder().build(entries)?, false),
        };
        if !files.is_empty() {
            ring.submitter().register_files(files)?;
        }
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(Ring {
            ring,
            in_flight: 0,
            cq_entries,
            waiting: VecDeque::new(),
            waiting_entries: 0,
            scratch: Vec::new(),
            deferred,
            files: !files.is_empty(),
        })
    }

    /// Make the ring usable on this thread, its single issuer from now on.
    pub(crate) fn enable(&self) -> io::Result<()> {
        if self.deferred {
            self.ring.submitter().register_enable_rings()?;
        }
        Ok(())
    }

    /// Queue `chain` (entries carrying their user data; all but the last linked to the
    /// next) whole: a chain cut in two by a submit would lose its order.
    ///
    /// # Safety
    /// Every buffer an entry points to stays valid until its completion is reaped.
    unsafe fn push_chain(&mut self, chain: &[squeue::Entry]) {
        if self.waiting.is_empty() && self.fits(chain.len()) {
            // SAFETY: the caller's contract.
            if unsafe { self.ring.submission().push_multiple(chain) }.is_ok() {
                self.in_flight += chain.len();
                return;
            }
        }
        self.waiting.push_back(chain.to_vec());
        self.waiting_entries += chain.len();
    }

    /// Room for `n` more entries: in the submission queue, and for their completions.
    fn fits(&mut self, n: usize) -> bool {
        let sq = self.ring.submission();
        self.in_flight + n <= self.cq_entries && sq.capacity() - sq.len() >= n
    }

    /// Move waiting chains to the submission queue while they fit.
    fn refill(&mut self) {
        while let Some(n) = self.waiting.front().map(Vec::len) {
            if !self.fits(n) {
                return;
            }
            let chain = self.waiting.front().expect("a chain");
            // SAFETY: `push_chain`'s contract held for these entries when they were pushed
            // and holds until they complete.
            if unsafe { self.ring.submission().push_multiple(chain) }.is_err() {
                return;
            }
            self.waiting.pop_front();
            self.waiting_entries -= n;
            self.in_flight += n;
        }
    }

    /// Read the 8 bytes of an eventfd (the reactor's doorbell) into `buf`.
    ///
    /// # Safety
    /// `buf` stays valid until the completion is reaped.
    pub(crate) unsafe fn read_eventfd(&mut self, fd: RawFd, buf: *mut u64, user_data: u64) {
        let e = opcode::Read::new(types::Fd(fd), buf.cast::<u8>(), 8)
            .build()
            .user_data(user_data);
        // SAFETY: the caller's contract.
        unsafe { self.push_chain(&[e]) };
    }

    /// Complete once `fd` is ready for `events` (poll(2) flags), once.
    pub(crate) fn poll_fd(&mut self, fd: RawFd, events: u32, user_data: u64) {
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(user_data);
        // SAFETY: a poll points to no buffer.
        unsafe { self.push_chain(&[e]) };
    }

    /// Cancel the entry with user data `target` (both complete).
    pub(crate) fn cancel(&mut self, target: u64, user_data: u64) {
        let e = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        // SAFETY: a cancellation points to no buffer.
        unsafe { self.push_chain(&[e]) };
    }

    /// Submit what is queued and sleep until a completion arrives or `timeout` passes.
    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.refill();
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The submission entry of a device operation on the registered files.
    fn entry(&self, op: DevOp) -> squeue::Entry {
        assert!(self.files, "device operations need the members registered");
        match op {
            DevOp::Read {
                member,
                pos,
                buf,
                len,
            } => opcode::Read::new(types::Fixed(member as u32), buf, len)
                .offset(pos)
                .build(),
            DevOp::Write {
                member,
                pos,
                buf,
                len,
                fua,
            } => opcode::Write::new(types::Fixed(member as u32), buf, len)
                .offset(pos)
                .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                .build(),
            DevOp::Flush { member } => opcode::Fsync::new(types::Fixed(member as u32))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
    }
}

impl Backend for Ring {
    unsafe fn push(&mut self, chain: &[(DevOp, u64)]) {
        let mut entries = std::mem::take(&mut self.scratch);
        let last = chain.len().saturating_sub(1);
        for (k, &(op, user_data)) in chain.iter().enumerate() {
            let e = self.entry(op).user_data(user_data);
            entries.push(if k < last {
                e.flags(squeue::Flags::IO_LINK)
            } else {
                e
            });
        }
        // SAFETY: `Backend::push`'s contract is `push_chain`'s.
        unsafe { self.push_chain(&entries) };
        entries.clear();
        self.scratch = entries;
    }

    fn queued(&self) -> usize {
        // SAFETY: reading the submission queue's length only.
        let sq_len = unsafe { self.ring.submission_shared().len() };
        sq_len + self.waiting_entries
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            self.refill();
            let pending = {
                let sq = self.ring.submission();
                !sq.is_empty() || sq.cq_overflow() || sq.taskrun()
            };
            if !pending {
                return Ok(());
            }
            self.ring.submit()?;
            // Chains still waiting go in a second round if the submit made room for them
            // (a full submission queue); if it is the completion queue's capacity, they wait
            // for the next reap.
            let room = self.waiting.front().is_some_and(|c| {
                let n = c.len();
                self.in_flight + n <= self.cq_entries
            });
            if !room {
                return Ok(());
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let before = out.len();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        self.in_flight -= out.len() - before;
    }

    fn runs_inline(&self) -> bool {
        false
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel drops a ring's registered files lazily; release them now so the pool's
        // device claims go with the engine.
        if self.files {
            let _ = self.ring.submitter().unregister_files();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::AlignedBuf;
    use std::os::unix::io::AsRawFd;

    /// A file of `blocks` 4 KiB blocks, block k filled with byte k.
    fn file(name: &str, blocks: u8) -> std::fs::File {
        let path = std::env::temp_dir().join(format!("tessel-uring-{}-{name}", std::process::id()));
        let data: Vec<u8> = (0..blocks).flat_map(|k| [k; 4096]).collect();
        std::fs::write(&path, data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// Submit, wait and reap until `n` completions came back.
    fn drain(ring: &mut Ring, n: usize) -> Vec<(u64, i32)> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            ring.submit().unwrap();
            ring.reap(&mut out);
            assert!(ring.in_flight <= ring.cq_entries);
            if out.len() >= n {
                return out;
            }
            ring.wait(Duration::from_millis(100)).unwrap();
        }
        panic!("{} of {n} completions after 1000 waits", out.len());
    }

    #[test]
    fn pushes_past_the_completion_queue_wait_for_a_reap_instead_of_overflowing_it() {
        let f = file("capacity", 64);
        let mut ring = Ring::new(8, &[f.as_raw_fd()]).unwrap();
        ring.enable().unwrap();
        let n = ring.cq_entries * 3;
        let mut bufs: Vec<AlignedBuf> = (0..n).map(|_| AlignedBuf::zeroed(4096)).collect();
        for (k, b) in bufs.iter_mut().enumerate() {
            let op = DevOp::Read {
                member: 0,
                pos: (k % 64) as u64 * 4096,
                buf: b.as_mut_ptr(),
                len: 4096,
            };
            // SAFETY: `bufs` outlives every completion (drained below).
            unsafe { ring.push(&[(op, k as u64)]) };
        }
        assert_eq!(ring.queued(), n, "nothing is lost or submitted early");
        ring.submit().unwrap();
        assert!(ring.in_flight <= ring.cq_entries, "the CQ's capacity held");
        assert!(
            ring.queued() >= n - ring.cq_entries,
            "the rest waits for a reap"
        );
        let mut out = drain(&mut ring, n);
        out.sort();
        assert_eq!(out, (0..n as u64).map(|k| (k, 4096)).collect::<Vec<_>>());
        for (k, b) in bufs.iter().enumerate() {
            assert!(
                b.as_slice().iter().all(|&x| x == (k % 64) as u8),
                "block {k}"
            );
        }
        assert_eq!((ring.in_flight, ring.queued()), (0, 0));
    }

    #[test]
    fn a_chain_stays_whole_and_a_failed_step_cancels_the_rest() {
        let f = file("chain", 4);
        let ro = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        let mut ring = Ring::new(8, &[f.as_raw_fd(), ro.as_raw_fd()]).unwrap();
        ring.enable().unwrap();
        let data = AlignedBuf::from_slice(&[9u8; 4096]);
        let write = |member| DevOp::Write {
            member,
            pos: 4096,
            buf: data.as_ptr(),
            len: 4096,
            fua: false,
        };
        // Fill the submission queue but one slot: a chain of three must not be cut.
        let mut spare = AlignedBuf::zeroed(4096);
        for k in 0..7 {
            let op = DevOp::Read {
                member: 0,
                pos: 0,
                buf: spare.as_mut_ptr(),
                len: 512,
            };
            // SAFETY: `spare` outlives the completions (drained below); reads of the same
            // bytes race only with each other.
            unsafe { ring.push(&[(op, 100 + k)]) };
        }
        // SAFETY: `data` outlives the completions (drained below).
        unsafe {
            ring.push(&[
                (DevOp::Flush { member: 0 }, 1),
                (write(0), 2),
                (DevOp::Flush { member: 0 }, 3),
            ]);
            ring.push(&[(write(1), 4), (DevOp::Flush { member: 1 }, 5)]);
        }
        let mut out = drain(&mut ring, 12);
        out.sort();
        let chains: Vec<_> = out.iter().filter(|c| c.0 < 100).copied().collect();
        assert_eq!(
            chains,
            [
                (1, 0),
                (2, 4096),
                (3, 0),
                (4, -libc::EBADF),
                (5, -libc::ECANCELED)
            ]
        );
        let mut back = [0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 4096).unwrap();
        assert!(back.iter().all(|&x| x == 9));
    }
}
