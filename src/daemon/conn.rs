//! A target connection hosted on a reactor: a non-blocking socket driven by the reactor's
//! loop, and a sans-IO protocol session (NBD or iSCSI) that turns bytes into engine requests.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessel_engine::{Completion, Engine, PollCtx, Poller};
use tessel_targets::export::{Actions, Exports};

/// What a connection needs from a protocol session.
pub trait Session: Send {
    /// Protocol name for logs.
    const PROTOCOL: &'static str;
    /// Consume received bytes; Err closes the connection after sending what is queued.
    fn receive(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, String>;
    /// An engine request finished.
    fn complete(&mut self, c: Completion, actions: &mut Actions);
    /// About once a second (keep-alives).
    fn tick(&mut self, _now: Instant, _actions: &mut Actions) -> Result<(), String> {
        Ok(())
    }
    /// The daemon is stopping.
    fn shut_down(&mut self, actions: &mut Actions);
    /// Engine requests in flight.
    fn in_flight(&self) -> usize;
}

/// Most bytes a connection reads per loop pass, so one busy connection cannot starve others.
const READ_CHUNK: usize = 256 << 10;
/// Receive buffer size: a read pass lands in one buffer, parsed in place (it grows only when
/// a single unparsed message, such as a long option, does not fit).
const INPUT_CAP: usize = 256 << 10;
/// Compact the receive buffer (move the unparsed tail to the front) when less than this
/// much room is left after it.
const INPUT_MIN_ROOM: usize = 64 << 10;
/// Stop reading while this many requests are in flight or this many bytes wait to be sent.
const MAX_IN_FLIGHT: usize = 512;
const MAX_OUT: usize = 64 << 20;
/// Output buffer capacity kept between bursts (larger buffers shrink back once sent).
const OUT_KEEP: usize = 1 << 20;

/// One connection and its session.
///
/// Per loop pass the connection makes at most one `recv` that returns data (and a second
/// only when the first filled the buffer), parses in place without moving the buffer, and
/// makes one `send` for every reply that became ready in the pass: completions only append
/// to the output buffer, the next `poll` (in the same reactor pass) writes it.
pub struct Connection<S: Session> {
    stream: TcpStream,
    peer: SocketAddr,
    session: S,
    exports: Arc<dyn Exports + Send + Sync>,
    /// Received bytes; `input[in_start..in_end]` is not parsed yet. Allocated once, zeroed
    /// once: reads land in it directly.
    input: Vec<u8>,
    in_start: usize,
    in_end: usize,
    /// What the session asks for; `actions.send[out_pos..]` is still to be written. The
    /// session appends replies to it directly, so reply bytes are copied once.
    actions: Actions,
    out_pos: usize,
    closing: bool,
    broken: bool,
    stopping_seen: bool,
    last_tick: Instant,
    count: Arc<std::sync::atomic::AtomicU32>,
}

impl<S: Session> Connection<S> {
    /// Wrap an accepted stream; `greeting` holds what the session queued at creation.
    pub fn new(
        stream: TcpStream,
        session: S,
        greeting: Actions,
        exports: Arc<dyn Exports + Send + Sync>,
        count: Arc<std::sync::atomic::AtomicU32>,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        count.fetch_add(1, Ordering::Relaxed);
        tracing::info!(protocol = S::PROTOCOL, %peer, "connection opened");
        let closing = greeting.close;
        Ok(Connection {
            stream,
            peer,
            session,
            exports,
            input: vec![0; INPUT_CAP],
            in_start: 0,
            in_end: 0,
            actions: greeting,
            out_pos: 0,
            closing,
            broken: false,
            stopping_seen: false,
            last_tick: Instant::now(),
            count,
        })
    }

    /// Bytes queued and not yet written.
    fn pending_out(&self) -> usize {
        self.actions.send.len() - self.out_pos
    }

    /// Hand the requests the session produced to the engine and note a close.
    fn take_actions(&mut self, ctx: &mut PollCtx<'_>) {
        for r in self.actions.submit.drain(..) {
            ctx.submit(r);
        }
        if self.actions.close {
            self.closing = true;
        }
    }

    fn write_out(&mut self) -> bool {
        let mut progress = false;
        let out = &mut self.actions.send;
        while self.out_pos < out.len() && !self.broken {
            match self.stream.write(&out[self.out_pos..]) {
                Ok(0) => self.broken = true,
                Ok(n) => {
                    self.out_pos += n;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %self.peer, "send failed: {e}");
                    self.broken = true;
                }
            }
        }
        if self.out_pos == out.len() {
            out.clear();
            self.out_pos = 0;
            if out.capacity() > OUT_KEEP {
                out.shrink_to(OUT_KEEP);
            }
        } else if self.out_pos >= OUT_KEEP && self.out_pos * 2 >= out.len() {
            // A client that never lets the buffer empty: drop what was sent (at most as
            // many bytes moved as were sent, so amortized O(1) per byte).
            out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        progress
    }

    /// Make room after the unparsed bytes: rewind when all is parsed, move the (short)
    /// unparsed tail to the front when room runs low, grow when one message fills it all.
    fn make_room(&mut self) {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
        }
        if self.input.len() - self.in_end >= INPUT_MIN_ROOM {
            return;
        }
        if self.in_start > 0 {
            self.input.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
        }
        if self.input.len() - self.in_end < INPUT_MIN_ROOM {
            let len = self.input.len();
            self.input.resize(len * 2, 0);
        }
    }

    fn read_in(&mut self) -> bool {
        let mut progress = false;
        let mut got = 0;
        while got < READ_CHUNK && !self.closing && !self.broken {
            self.make_room();
            let room = self.input.len() - self.in_end;
            match self.stream.read(&mut self.input[self.in_end..]) {
                Ok(0) => {
                    self.closing = true;
                    tracing::debug!(peer = %self.peer, "peer closed");
                }
                Ok(n) => {
                    self.in_end += n;
                    got += n;
                    progress = true;
                    if n < room {
                        // The socket had less than we offered: it is drained, so skip the
                        // recv that would only say EAGAIN.
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(peer = %self.peer, "receive failed: {e}");
                    self.broken = true;
                }
            }
        }
        progress
    }

    /// Feed the unparsed input to the session.
    fn parse(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        if self.in_start == self.in_end || self.broken {
            return false;
        }
        let input = &self.input[self.in_start..self.in_end];
        let r = self
            .session
            .receive(input, &*self.exports, &mut self.actions);
        let progress = match r {
            Ok(n) => {
                self.in_start += n;
                n > 0
            }
            Err(e) => {
                tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
                self.closing = true;
                self.in_start = 0;
                self.in_end = 0;
                false
            }
        };
        self.take_actions(ctx);
        progress
    }
}

impl<S: Session> Poller for Connection<S> {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        let mut progress = false;
        if ctx.stopping() && !self.stopping_seen {
            self.stopping_seen = true;
            self.session.shut_down(&mut self.actions);
            self.closing = true;
            self.take_actions(ctx);
        }
        let backlog = self.session.in_flight() >= MAX_IN_FLIGHT || self.pending_out() >= MAX_OUT;
        if !backlog && self.read_in() {
            progress = true;
        }
        progress |= self.parse(ctx);
        if self.last_tick.elapsed() >= Duration::from_secs(1) {
            self.last_tick = Instant::now();
            if let Err(e) = self.session.tick(self.last_tick, &mut self.actions) {
                tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
                self.closing = true;
            }
            self.take_actions(ctx);
        }
        // One send for the replies of every completion delivered since the last pass and
        // for what parsing produced.
        progress |= self.write_out();
        progress
    }

    fn complete(&mut self, c: Completion, ctx: &mut PollCtx<'_>) {
        // Only queue the reply: the reactor polls this connection later in the same pass,
        // and that poll writes all queued replies with one send.
        self.session.complete(c, &mut self.actions);
        self.take_actions(ctx);
    }

    fn wait_fd(&self) -> Option<(i32, u32)> {
        let mut ev = libc::POLLIN as u32;
        if self.pending_out() > 0 {
            ev |= libc::POLLOUT as u32;
        }
        Some((self.stream.as_raw_fd(), ev))
    }

    fn finished(&self) -> bool {
        let done = (self.closing && self.pending_out() == 0) || self.broken;
        done && self.session.in_flight() == 0
    }
}

impl<S: Session> Drop for Connection<S> {
    fn drop(&mut self) {
        // Shut the socket down before its fd is closed: an io_uring poll the reactor armed
        // on it holds a reference to the socket, so a bare close would neither send the FIN
        // nor complete that poll, and the reactor, which waits for it, would never stop.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.count.fetch_sub(1, Ordering::Relaxed);
        tracing::info!(protocol = S::PROTOCOL, peer = %self.peer, "connection closed");
    }
}

/// Accept connections on `listener` until the engine stops, spreading them over reactors.
pub fn accept_loop<S: Session + 'static>(
    listener: std::net::TcpListener,
    engine: Engine,
    exports: Arc<dyn Exports + Send + Sync>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    count: Arc<std::sync::atomic::AtomicU32>,
    make: impl Fn() -> (S, Actions) + Send + 'static,
) {
    let mut next = 0usize;
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(protocol = S::PROTOCOL, "accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (session, greeting) = make();
        match Connection::new(stream, session, greeting, exports.clone(), count.clone()) {
            Ok(c) => {
                engine.add_poller(next, Box::new(c));
                next = next.wrapping_add(1);
            }
            Err(e) => tracing::warn!(protocol = S::PROTOCOL, "connection setup failed: {e}"),
        }
    }
}
