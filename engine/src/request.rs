//! A request in flight inside the engine: split into pieces (one per shard, sent to the
//! owner reactor) and cluster operations; the last one to finish answers the caller.

use crate::buf::AlignedBuf;
use crate::error::IoError;
use crate::io::{Completion, Extent, Op};
use crossbeam_queue::SegQueue;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;

/// Where completions go: a queue and a way to wake whoever reads it.
pub struct Sink {
    queue: SegQueue<(u32, Completion)>,
    waker: Waker,
}

/// How to wake a sink's reader.
pub enum Waker {
    /// A thread that parks in `Client::wait`; `parked` is set only while it may sleep, so
    /// a busy client costs completions no syscall.
    Thread {
        thread: std::sync::OnceLock<Thread>,
        parked: AtomicBool,
    },
    /// A reactor (its eventfd).
    Reactor(Arc<Doorbell>),
}

impl Sink {
    /// A sink read by a thread.
    pub fn for_thread() -> Arc<Sink> {
        Arc::new(Sink {
            queue: SegQueue::new(),
            waker: Waker::Thread {
                thread: std::sync::OnceLock::new(),
                parked: AtomicBool::new(false),
            },
        })
    }

    /// A sink read by a reactor.
    pub fn for_reactor(bell: Arc<Doorbell>) -> Arc<Sink> {
        Arc::new(Sink {
            queue: SegQueue::new(),
            waker: Waker::Reactor(bell),
        })
    }

    /// Deliver a completion for `route` (a poller id on reactors; 0 for threads).
    pub fn push(&self, route: u32, c: Completion) {
        self.queue.push((route, c));
        match &self.waker {
            Waker::Thread { thread, parked } => {
                if parked.swap(false, Ordering::SeqCst) {
                    if let Some(t) = thread.get() {
                        t.unpark();
                    }
                }
            }
            Waker::Reactor(bell) => bell.ring(),
        }
    }

    /// Take one completion.
    pub fn pop(&self) -> Option<(u32, Completion)> {
        self.queue.pop()
    }

    /// True when no completion waits.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Block the calling thread until a completion arrives (or `timeout`).
    pub fn park(&self, timeout: std::time::Duration) {
        let Waker::Thread { thread, parked } = &self.waker else {
            return;
        };
        let _ = thread.set(std::thread::current());
        parked.store(true, Ordering::SeqCst);
        if self.queue.is_empty() {
            std::thread::park_timeout(timeout);
        }
        parked.store(false, Ordering::SeqCst);
    }
}

/// A reactor's wake-up line: an eventfd written only while the reactor sleeps.
pub struct Doorbell {
    pub(crate) fd: i32,
    pub(crate) sleeping: AtomicBool,
}

impl Doorbell {
    /// A new eventfd.
    pub fn new() -> std::io::Result<Arc<Doorbell>> {
        // SAFETY: plain syscall; the fd is owned by the Doorbell and closed in Drop.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Doorbell {
            fd,
            sleeping: AtomicBool::new(false),
        }))
    }

    /// Wake the reactor if it sleeps (one syscall only then).
    pub fn ring(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.fd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: fd was opened by `new` and is closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// Where a request's completion goes.
pub enum ReplyTo {
    /// A sink read by a client thread.
    Sink(Arc<Sink>),
    /// The completion sink of reactor `core`: requests of the pollers it hosts. When `core`
    /// itself finishes the request, the completion skips the sink (see `Reactor::reply`).
    Reactor(usize),
}

impl ReplyTo {
    /// Deliver `c` for `route` through the sink (from any thread); `sink_of(core)` is
    /// reactor `core`'s completion sink.
    pub fn push<'a>(&self, sink_of: impl FnOnce(usize) -> &'a Sink, route: u32, c: Completion) {
        match self {
            ReplyTo::Sink(s) => s.push(route, c),
            ReplyTo::Reactor(core) => sink_of(*core).push(route, c),
        }
    }
}

/// The caller's request while its pieces are in flight.
pub struct Parent {
    pub tag: u64,
    pub op: Op,
    pub offset: u64,
    pub len: u64,
    buf: UnsafeCell<Option<AlignedBuf>>,
    data: *mut u8,
    remaining: AtomicU32,
    error: OnceLock<IoError>,
    extents: Mutex<Vec<Extent>>,
    pub(crate) reply: ReplyTo,
    pub(crate) route: u32,
    /// When the request was submitted (latency statistics): for a poller's requests, when
    /// its batch was (see `PollCtx::submit`).
    pub started: std::time::Instant,
}

// SAFETY: the buffer is only reached through `data` by pieces that write disjoint byte
// ranges (see `slice`), and taken out once, by the last piece, after all others finished.
unsafe impl Send for Parent {}
// SAFETY: as above.
unsafe impl Sync for Parent {}

impl Parent {
    /// A request with `parts` pieces to wait for.
    #[allow(clippy::too_many_arguments)] // the request's own fields, plus where to answer
    pub fn new(
        tag: u64,
        op: Op,
        offset: u64,
        len: u64,
        buf: Option<AlignedBuf>,
        reply: ReplyTo,
        route: u32,
        parts: u32,
        started: std::time::Instant,
    ) -> Arc<Parent> {
        let p = Parent::build(tag, op, offset, len, buf, reply, route, parts, started);
        Arc::new(p)
    }

    /// The request `new` shares, before it is shared (see `ParentPool::make`).
    #[allow(clippy::too_many_arguments)] // as `new`
    pub(crate) fn build(
        tag: u64,
        op: Op,
        offset: u64,
        len: u64,
        mut buf: Option<AlignedBuf>,
        reply: ReplyTo,
        route: u32,
        parts: u32,
        started: std::time::Instant,
    ) -> Parent {
        let data = buf
            .as_mut()
            .map_or(std::ptr::null_mut(), |b| b.as_mut_ptr());
        Parent {
            tag,
            op,
            offset,
            len,
            buf: UnsafeCell::new(buf),
            data,
            remaining: AtomicU32::new(parts),
            error: OnceLock::new(),
            extents: Mutex::new(Vec::new()),
            reply,
            route,
            started,
        }
    }

    /// The caller's buffer bytes `off..off+len` (byte offsets from the request's start).
    ///
    /// # Safety
    /// Each byte range must be handed to one piece at a time, and only before that piece
    /// calls `finish`.
    #[allow(clippy::mut_from_ref)] // disjoint ranges handed to one piece each (see Safety)
    pub unsafe fn slice(&self, off: usize, len: usize) -> &mut [u8] {
        debug_assert!(!self.data.is_null() && (off + len) as u64 <= self.len);
        std::slice::from_raw_parts_mut(self.data.add(off), len)
    }

    /// Raw pointer to byte `off` of the caller's buffer, for device I/O.
    pub fn ptr(&self, off: usize) -> *mut u8 {
        // SAFETY: in bounds (checked by callers against `len`).
        unsafe { self.data.add(off) }
    }

    /// Announce `n` more parts (a piece split into cluster operations).
    pub fn add_parts(&self, n: u32) {
        self.remaining.fetch_add(n, Ordering::Relaxed);
    }

    /// Record extents found by a BlockStatus part (the only parts that touch the lock).
    pub fn add_extents(&self, e: &[Extent]) {
        self.extents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(e);
    }

    /// One part is done (with its result); the last one returns the caller's completion,
    /// to be delivered as `reply` says (see `Reactor::reply`).
    pub(crate) fn settle(&self, result: Result<(), IoError>) -> Option<Completion> {
        if let Err(e) = result {
            let _ = self.error.set(e);
        }
        // The only part left needs no locked decrement: nobody else holds a part that
        // could change the count (the Acquire load pairs with the others' AcqRel).
        if self.remaining.load(Ordering::Acquire) != 1
            && self.remaining.fetch_sub(1, Ordering::AcqRel) != 1
        {
            return None;
        }
        // SAFETY: every other part has finished (the counter reached zero), so nobody
        // else reaches the buffer any more.
        let buf = unsafe { (*self.buf.get()).take() };
        let merged = if self.op == crate::io::Op::BlockStatus {
            let mut extents =
                std::mem::take(&mut *self.extents.lock().unwrap_or_else(|p| p.into_inner()));
            extents.sort_by_key(|e| e.offset);
            merge_extents(extents)
        } else {
            Vec::new()
        };
        let result = match self.error.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        Some(Completion {
            tag: self.tag,
            result,
            buf,
            extents: merged,
        })
    }
}

/// Finished requests kept by a reactor to hold its next ones: once warm, a request costs
/// no allocation and no free (glibc keeps only 7 chunks of a size per thread cache, fewer
/// than a queue depth's worth, and the rest took its slow paths).
#[derive(Default)]
pub(crate) struct ParentPool(Vec<Arc<Parent>>);

impl ParentPool {
    /// Requests kept at most.
    const KEEP: usize = 256;

    /// Keep `p` for reuse if this is its last reference; drop it otherwise. Only requests
    /// of reactor pollers are kept: one of a client thread holds the client's sink.
    pub(crate) fn put(&mut self, p: Arc<Parent>) {
        if self.0.len() < Self::KEEP
            && matches!(p.reply, ReplyTo::Reactor(_))
            && Arc::strong_count(&p) == 1
            && Arc::weak_count(&p) == 0
        {
            self.0.push(p);
        }
    }

    /// Share `p`, in a kept allocation when there is one.
    pub(crate) fn make(&mut self, p: Parent) -> Arc<Parent> {
        if let Some(mut a) = self.0.pop() {
            // Always unique: `put` keeps only last references and nothing clones them.
            if let Some(slot) = Arc::get_mut(&mut a) {
                *slot = p;
                return a;
            }
        }
        Arc::new(p)
    }
}

fn merge_extents(v: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for e in v {
        match out.last_mut() {
            Some(l) if l.allocated == e.allocated && l.offset + l.len == e.offset => l.len += e.len,
            _ => out.push(e),
        }
    }
    out
}
