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
/// Stop reading while this many requests are in flight or this many bytes wait to be sent.
const MAX_IN_FLIGHT: usize = 512;
const MAX_OUT: usize = 64 << 20;

/// One connection and its session.
pub struct Connection<S: Session> {
    stream: TcpStream,
    peer: SocketAddr,
    session: S,
    exports: Arc<dyn Exports + Send + Sync>,
    input: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    actions: Actions,
    closing: bool,
    broken: bool,
    stopping_seen: bool,
    last_tick: Instant,
}

impl<S: Session> Connection<S> {
    /// Wrap an accepted stream; `greeting` holds what the session queued at creation.
    pub fn new(
        stream: TcpStream,
        session: S,
        greeting: Actions,
        exports: Arc<dyn Exports + Send + Sync>,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let peer = stream.peer_addr()?;
        tracing::info!(protocol = S::PROTOCOL, %peer, "connection opened");
        let mut c = Connection {
            stream,
            peer,
            session,
            exports,
            input: Vec::with_capacity(READ_CHUNK),
            out: Vec::new(),
            out_pos: 0,
            actions: Actions::default(),
            closing: false,
            broken: false,
            stopping_seen: false,
            last_tick: Instant::now(),
        };
        c.absorb(greeting, None);
        Ok(c)
    }

    /// Take a session's actions: queue bytes, submit requests, note a close.
    fn absorb(&mut self, mut a: Actions, ctx: Option<&mut PollCtx<'_>>) {
        if !a.send.is_empty() {
            if self.out.is_empty() {
                std::mem::swap(&mut self.out, &mut a.send);
            } else {
                self.out.extend_from_slice(&a.send);
            }
        }
        if let Some(ctx) = ctx {
            for r in a.submit.drain(..) {
                ctx.submit(r);
            }
        }
        if a.close {
            self.closing = true;
        }
    }

    fn write_out(&mut self) -> bool {
        let mut progress = false;
        while self.out_pos < self.out.len() && !self.broken {
            match self.stream.write(&self.out[self.out_pos..]) {
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
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        progress
    }

    fn read_in(&mut self) -> bool {
        let mut progress = false;
        let mut got = 0;
        while got < READ_CHUNK && !self.closing && !self.broken {
            let len = self.input.len();
            self.input.resize(len + 64 * 1024, 0);
            match self.stream.read(&mut self.input[len..]) {
                Ok(0) => {
                    self.input.truncate(len);
                    self.closing = true;
                    tracing::debug!(peer = %self.peer, "peer closed");
                }
                Ok(n) => {
                    self.input.truncate(len + n);
                    got += n;
                    progress = true;
                }
                Err(e) => {
                    self.input.truncate(len);
                    if e.kind() == ErrorKind::WouldBlock {
                        break;
                    }
                    if e.kind() != ErrorKind::Interrupted {
                        tracing::debug!(peer = %self.peer, "receive failed: {e}");
                        self.broken = true;
                    }
                }
            }
        }
        progress
    }
}

impl<S: Session> Poller for Connection<S> {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        let mut progress = self.write_out();
        if ctx.stopping() && !self.stopping_seen {
            self.stopping_seen = true;
            let mut a = std::mem::take(&mut self.actions);
            self.session.shut_down(&mut a);
            self.closing = true;
            self.absorb(a, Some(ctx));
        }
        let backlog = self.session.in_flight() >= MAX_IN_FLIGHT || self.out.len() >= MAX_OUT;
        if !backlog && self.read_in() {
            progress = true;
        }
        if !self.input.is_empty() && !self.broken {
            let mut a = std::mem::take(&mut self.actions);
            let r = self.session.receive(&self.input, &*self.exports, &mut a);
            match r {
                Ok(n) => {
                    if n > 0 {
                        self.input.drain(..n);
                        progress = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
                    self.closing = true;
                    self.input.clear();
                }
            }
            self.absorb(a, Some(ctx));
        }
        if self.last_tick.elapsed() >= Duration::from_secs(1) {
            self.last_tick = Instant::now();
            let mut a = std::mem::take(&mut self.actions);
            if let Err(e) = self.session.tick(self.last_tick, &mut a) {
                tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
                self.closing = true;
            }
            self.absorb(a, Some(ctx));
        }
        progress |= self.write_out();
        progress
    }

    fn complete(&mut self, c: Completion, ctx: &mut PollCtx<'_>) {
        let mut a = std::mem::take(&mut self.actions);
        self.session.complete(c, &mut a);
        self.absorb(a, Some(ctx));
        self.write_out();
    }

    fn wait_fd(&self) -> Option<(i32, u32)> {
        let mut ev = libc::POLLIN as u32;
        if !self.out.is_empty() {
            ev |= libc::POLLOUT as u32;
        }
        Some((self.stream.as_raw_fd(), ev))
    }

    fn finished(&self) -> bool {
        let done = (self.closing && self.out.is_empty()) || self.broken;
        done && self.session.in_flight() == 0
    }
}

impl<S: Session> Drop for Connection<S> {
    fn drop(&mut self) {
        // Shut the socket down before its fd is closed: an io_uring poll the reactor armed
        // on it holds a reference to the socket, so a bare close would neither send the FIN
        // nor complete that poll, and the reactor, which waits for it, would never stop.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        tracing::info!(protocol = S::PROTOCOL, peer = %self.peer, "connection closed");
    }
}

/// Accept connections on `listener` until the engine stops, spreading them over reactors.
pub fn accept_loop<S: Session + 'static>(
    listener: std::net::TcpListener,
    engine: Engine,
    exports: Arc<dyn Exports + Send + Sync>,
    stop: Arc<std::sync::atomic::AtomicBool>,
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
        match Connection::new(stream, session, greeting, exports.clone()) {
            Ok(c) => {
                engine.add_poller(next, Box::new(c));
                next = next.wrapping_add(1);
            }
            Err(e) => tracing::warn!(protocol = S::PROTOCOL, "connection setup failed: {e}"),
        }
    }
}
