//! Validate a request and split it at shard boundaries into pieces for the owner reactors.

use crate::error::IoError;
use crate::io::{Completion, Op, Request};
use crate::reactor::{Msg, Piece, Shared};
use crate::request::{Parent, ReplyTo};
use crate::volume::MetaCache;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Shard number marking a flush piece (every reactor gets one).
pub const FLUSH_SHARD: u64 = u64::MAX;

fn check(req: &Request, block_size: u32, size: u64, read_only: bool) -> Result<(), IoError> {
    if req.op == Op::Flush && req.buf.is_none() {
        return Ok(());
    }
    if req.len == 0 {
        return Err(IoError::ZeroLength);
    }
    // Block sizes are powers of two (512 or 4096): a mask, not a division. Only reads and
    // block status must be aligned (a read goes from the device straight into the caller's
    // buffer); writes, trims and write-zeroes may cover any bytes: the data path merges a
    // partial grain with its current contents under the cluster's exclusive lock, the same
    // read-modify-write a 512-byte write within a 4 KiB grain has always had.
    debug_assert!(block_size.is_power_of_two());
    let mask = block_size as u64 - 1;
    let aligned_only = matches!(req.op, Op::Read | Op::BlockStatus);
    if aligned_only && (req.offset & mask != 0 || req.len & mask != 0) {
        return Err(IoError::Misaligned {
            offset: req.offset,
            len: req.len,
            block_size,
        });
    }
    if req.offset.checked_add(req.len).is_none_or(|end| end > size) {
        return Err(IoError::OutOfRange {
            offset: req.offset,
            len: req.len,
            size,
        });
    }
    if read_only && req.op.is_write() {
        return Err(IoError::ReadOnly);
    }
    let needs_buf = matches!(req.op, Op::Read | Op::Write { .. });
    match &req.buf {
        Some(b) if needs_buf && b.len() as u64 == req.len => Ok(()),
        None if !needs_buf => Ok(()),
        _ => Err(IoError::BadBuffer),
    }
}

/// Validate `req` and send its pieces through `send(reactor, msg)`; failures are answered
/// through `reply` at once. `share` makes the request shareable by its pieces (a reactor
/// reuses finished requests for it).
#[allow(clippy::too_many_arguments)] // the request, where it answers, and the two hooks
pub fn dispatch(
    shared: &Shared,
    cache: &mut MetaCache,
    req: Request,
    reply: ReplyTo,
    route: u32,
    started: std::time::Instant,
    mut share: impl FnMut(Parent) -> Arc<Parent>,
    mut send: impl FnMut(usize, Msg),
) {
    if shared.stopping.load(Ordering::Relaxed) {
        let Request { tag, buf, .. } = req;
        reply.push(
            |core| &shared.inboxes[core].sink,
            route,
            Completion {
                tag,
                result: Err(IoError::ShuttingDown),
                buf,
                extents: Vec::new(),
            },
        );
        return;
    }
    let meta = cache.get(&shared.volumes, req.volume.0);
    let verdict = match &meta {
        None => Err(IoError::UnknownVolume),
        Some(m) => check(
            &req,
            m.block_size,
            m.size.load(Ordering::Acquire),
            m.read_only,
        ),
    };
    let Request {
        tag,
        volume,
        op,
        offset,
        len,
        buf,
    } = req;
    if let Err(e) = verdict {
        reply.push(
            |core| &shared.inboxes[core].sink,
            route,
            Completion {
                tag,
                result: Err(e),
                buf,
                extents: Vec::new(),
            },
        );
        return;
    }
    let n = shared.inboxes.len();
    if op == Op::Flush {
        let parent = share(Parent::build(
            tag, op, 0, 0, None, reply, route, n as u32, started,
        ));
        for r in 0..n {
            send(
                r,
                Msg::Piece(Piece {
                    parent: parent.clone(),
                    vol: volume.0,
                    shard: FLUSH_SHARD,
                    off: 0,
                    len: 0,
                    buf_off: 0,
                }),
            );
        }
        return;
    }
    let ss = shared.layout.shard_size;
    let first = shared.layout.shard_of(offset);
    let last = shared.layout.shard_of(offset + len - 1);
    let parent = share(Parent::build(
        tag,
        op,
        offset,
        len,
        buf,
        reply,
        route,
        (last - first + 1) as u32,
        started,
    ));
    let mut pos = offset;
    let end = offset + len;
    // Each piece holds a reference; the last one takes this one.
    let mut parent = Some(parent);
    for shard in first..=last {
        let piece_end = ((shard + 1) * ss).min(end);
        let mine = if shard < last {
            parent.clone()
        } else {
            parent.take()
        };
        let piece = Piece {
            parent: mine.expect("a reference per piece"),
            vol: volume.0,
            shard,
            off: pos,
            len: piece_end - pos,
            buf_off: (pos - offset) as usize,
        };
        send(shared.owner(shard), Msg::Piece(piece));
        pos = piece_end;
    }
}
