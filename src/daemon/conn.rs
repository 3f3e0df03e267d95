//! A target connection hosted on a reactor: a non-blocking socket driven by the reactor's
//! loop, and a sans-IO protocol session (NBD or iSCSI) that turns bytes into engine requests.
//!
//! Hostile or broken peers are contained here: a panic in session code closes that
//! connection only, the accept loops survive fd exhaustion with back-off, and every
//! connection runs under the [`Limits`] of `[limits]` (counts per target and per client
//! address, handshake and idle timeouts).
//!
//! A session that acknowledges NBD_OPT_STARTTLS gets a [`TlsLayer`] under it: from then on
//! the socket carries ciphertext while the receive and send buffers keep holding the
//! plaintext the session reads and writes. Without TLS the socket feeds those buffers
//! directly, as before: no copy, only a few flag checks per pass.

use std::collections::{BTreeMap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::io::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessel_engine::{Completion, Engine, Op, PollCtx, Poller, VolumeId};
use tessel_targets::export::{Actions, Exports};

use super::tls::{Received, TlsLayer};

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
    /// True until the peer has chosen an export or logged in: the handshake timeout runs.
    fn handshaking(&self) -> bool;
    /// The images the connection uses, for the in-use checks of destructive commands.
    fn volume_use(&self) -> VolumeUse;
    /// What `session list` shows of it; asked when `volume_use` changes.
    fn describe(&self) -> Described;
    /// True while a request waits for memory: read no more input until bytes come back.
    fn waiting_for_memory(&self) -> bool {
        false
    }
    /// `bytes` of output are still queued to send (replies beyond them have left).
    fn queued(&mut self, _bytes: usize) {}
}

/// Which images a connection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VolumeUse {
    /// None yet (handshake, discovery).
    #[default]
    None,
    /// This one image (an NBD export: a volume or a snapshot).
    One(VolumeId),
    /// The iSCSI target of this volume: the volume as LUN 0 and its exported snapshots.
    Target(VolumeId),
}

/// A session as `session list` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Described {
    /// NBD: the export chosen.
    pub export: Option<String>,
    /// iSCSI: the initiator's IQN.
    pub initiator: Option<String>,
    /// iSCSI: the target's IQN.
    pub target: Option<String>,
}

/// Limits every host connection runs under (`[limits]` in the configuration).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections each target (NBD, iSCSI) holds at once.
    pub connections: u32,
    /// Connections each target holds from one client address.
    pub connections_per_client: u32,
    /// Longest time from accept to a chosen export or a finished login.
    pub handshake_timeout: Duration,
    /// Longest time a connection with nothing in flight may stay silent; None: no limit.
    pub idle_timeout: Option<Duration>,
}

/// The daemon's open host connections: what the limits count, what `session list` shows,
/// and what destructive commands check (and close) before they run.
pub struct Registry {
    limits: Limits,
    tally: Mutex<Tally>,
    sessions: Mutex<BTreeMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct Tally {
    per_target: HashMap<&'static str, u32>,
    per_client: HashMap<(&'static str, IpAddr), u32>,
}

/// One open connection as the control side sees it. The connection updates the counters
/// (relaxed atomics: figures for people, read while it runs) and its use when it changes.
pub struct Entry {
    pub id: u64,
    pub protocol: &'static str,
    pub peer: SocketAddr,
    pub since_unix: u64,
    pub in_flight: AtomicU64,
    pub read_bytes: AtomicU64,
    pub written_bytes: AtomicU64,
    state: Mutex<(VolumeUse, Described)>,
    /// A second handle on the socket: shutting it down ends the connection from any
    /// thread (its reactor sees end of file and closes it once its requests are done).
    closer: TcpStream,
}

impl Entry {
    /// The images it uses and its description.
    pub fn state(&self) -> (VolumeUse, Described) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Disconnect the host.
    pub fn close(&self) {
        let _ = self.closer.shutdown(std::net::Shutdown::Both);
    }
}

impl Registry {
    /// A registry enforcing `limits`.
    pub fn new(limits: Limits) -> Arc<Registry> {
        Arc::new(Registry {
            limits,
            tally: Mutex::new(Tally::default()),
            sessions: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions_locked(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Entry>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a new connection of `protocol` from `peer` on `stream`, or why there is
    /// none.
    fn admit(
        self: &Arc<Self>,
        protocol: &'static str,
        peer: SocketAddr,
        stream: &TcpStream,
    ) -> Result<Slot, String> {
        let ip = peer.ip();
        let closer = stream
            .try_clone()
            .map_err(|e| format!("cannot keep a handle on the socket: {e}"))?;
        let mut t = self.tally();
        let target = t.per_target.get(protocol).copied().unwrap_or(0);
        if target >= self.limits.connections {
            return Err(format!(
                "{target} connections open, the limit (limits.connections)"
            ));
        }
        let client = t.per_client.get(&(protocol, ip)).copied().unwrap_or(0);
        if client >= self.limits.connections_per_client {
            return Err(format!(
                "{client} connections open from {ip}, the limit (limits.connections_per_client)"
            ));
        }
        *t.per_target.entry(protocol).or_default() += 1;
        *t.per_client.entry((protocol, ip)).or_default() += 1;
        drop(t);
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            protocol,
            peer,
            since_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            in_flight: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            state: Mutex::new(Default::default()),
            closer,
        });
        self.sessions_locked().insert(entry.id, entry.clone());
        Ok(Slot {
            registry: self.clone(),
            entry,
            volume: VolumeUse::None,
        })
    }

    /// Open connections of every target.
    pub fn open(&self) -> u32 {
        self.tally().per_target.values().sum()
    }

    /// Every open connection, oldest first.
    pub fn sessions(&self) -> Vec<Arc<Entry>> {
        self.sessions_locked().values().cloned().collect()
    }

    /// The open connection `id`.
    pub fn session(&self, id: u64) -> Option<Arc<Entry>> {
        self.sessions_locked().get(&id).cloned()
    }

    /// Open connections whose use `matches`.
    pub fn matching(&self, matches: impl Fn(VolumeUse) -> bool) -> Vec<Arc<Entry>> {
        self.sessions()
            .into_iter()
            .filter(|e| matches(e.state().0))
            .collect()
    }
}

/// One connection's place in the [`Registry`], given back when dropped.
struct Slot {
    registry: Arc<Registry>,
    entry: Arc<Entry>,
    /// The use last recorded in `entry`, so that an unchanged one costs no lock.
    volume: VolumeUse,
}

impl Slot {
    fn set_volume(&mut self, volume: VolumeUse, describe: impl FnOnce() -> Described) {
        if volume == self.volume {
            return;
        }
        self.volume = volume;
        let described = describe();
        *self.entry.state.lock().unwrap_or_else(|p| p.into_inner()) = (volume, described);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.sessions_locked().remove(&self.entry.id);
        let mut t = self.registry.tally();
        let protocol = self.entry.protocol;
        if let Some(n) = t.per_target.get_mut(protocol) {
            *n = n.saturating_sub(1);
        }
        let key = (protocol, self.entry.peer.ip());
        if let Some(n) = t.per_client.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                t.per_client.remove(&key);
            }
        }
    }
}

/// Lets through one warning per interval and counts the ones it held back, so a condition
/// that repeats every few milliseconds (fd exhaustion) logs a line every few seconds.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            held: 0,
        }
    }

    /// Some(lines held back since the last one) when this one may be logged.
    pub fn pass(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|l| now - l < self.every) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
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
    /// Engine requests submitted and not completed: counted here, not asked of the
    /// session, so a connection whose session panicked still waits for them (their
    /// completions are routed to this poller's slot) before it goes.
    in_flight: usize,
    closing: bool,
    broken: bool,
    /// Credentials for a session that asks for TLS; None: no session of this target does.
    tls_config: Option<Arc<rustls::ServerConfig>>,
    /// The session acknowledged STARTTLS: its plain-text reply drains, then TLS starts.
    tls_pending: bool,
    /// TLS under the session, once started.
    tls: Option<Box<TlsLayer>>,
    /// The session panicked: it is never called again, only dropped.
    poisoned: bool,
    stopping_seen: bool,
    opened: Instant,
    last_input: Instant,
    last_tick: Instant,
    slot: Slot,
}

impl<S: Session> Connection<S> {
    /// Wrap an accepted stream holding `slot`; `greeting` holds what the session queued
    /// at creation; `tls_config` serves a session that asks for TLS.
    fn new(
        stream: TcpStream,
        peer: SocketAddr,
        session: S,
        greeting: Actions,
        exports: Arc<dyn Exports + Send + Sync>,
        slot: Slot,
        tls_config: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        tracing::info!(protocol = S::PROTOCOL, %peer, "connection opened");
        let closing = greeting.close;
        let now = Instant::now();
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
            in_flight: 0,
            closing,
            broken: false,
            tls_config,
            tls_pending: false,
            tls: None,
            poisoned: false,
            stopping_seen: false,
            opened: now,
            last_input: now,
            last_tick: now,
            slot,
        })
    }

    /// Run session code. A panic in it closes this connection only: it is caught here,
    /// logged with the peer, and the session is never called again.
    ///
    /// AssertUnwindSafe holds because nothing a panicking call may leave half changed is
    /// observed afterwards: the session is only dropped, the requests and bytes it queued
    /// in `actions` are discarded unsent, and the exports it reads are shared read-only.
    fn with_session<R>(&mut self, f: impl FnOnce(&mut S, &mut Actions) -> R) -> Option<R> {
        if self.poisoned {
            return None;
        }
        let (session, actions) = (&mut self.session, &mut self.actions);
        match catch_unwind(AssertUnwindSafe(|| f(session, actions))) {
            Ok(r) => Some(r),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("no message");
                tracing::error!(
                    protocol = S::PROTOCOL,
                    peer = %self.peer,
                    "session panicked; closing this connection: {message}"
                );
                self.poisoned = true;
                self.closing = true;
                self.broken = true;
                self.actions = Actions::default();
                self.out_pos = 0;
                let _ = self.stream.shutdown(std::net::Shutdown::Both);
                None
            }
        }
    }

    /// Bytes queued and not yet written.
    fn pending_out(&self) -> usize {
        self.actions.send.len() - self.out_pos
    }

    /// Hand the requests the session produced to the engine and note a close.
    fn take_actions(&mut self, ctx: &mut PollCtx<'_>) {
        let entry = &self.slot.entry;
        for r in self.actions.submit.drain(..) {
            match r.op {
                Op::Read => entry.read_bytes.fetch_add(r.len, Ordering::Relaxed),
                Op::Write { .. } => entry.written_bytes.fetch_add(r.len, Ordering::Relaxed),
                _ => 0,
            };
            self.in_flight += 1;
            ctx.submit(r);
        }
        entry
            .in_flight
            .store(self.in_flight as u64, Ordering::Relaxed);
        if self.actions.close {
            self.closing = true;
        }
        if std::mem::take(&mut self.actions.start_tls) {
            self.tls_pending = true;
        }
    }

    fn write_out(&mut self) -> bool {
        let progress = if self.tls.is_some() {
            self.send_tls()
        } else {
            self.send_plain()
        };
        let out = &mut self.actions.send;
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
        if progress {
            let queued = self.pending_out();
            self.with_session(|s, _| s.queued(queued));
        }
        progress
    }

    /// `send_plain` through TLS; once the connection closes and every reply is in, TLS
    /// ends with close_notify.
    fn send_tls(&mut self) -> bool {
        let Some(tls) = self.tls.as_mut().filter(|_| !self.broken) else {
            return false;
        };
        let plain = &self.actions.send[self.out_pos..];
        let sent = tls.send(&mut self.stream, plain).and_then(|n| {
            if self.closing && n == plain.len() {
                tls.close();
                tls.flush(&mut self.stream)?;
            }
            Ok(n)
        });
        match sent {
            Ok(n) => {
                self.out_pos += n;
                n > 0
            }
            Err(e) => {
                tracing::debug!(peer = %self.peer, "send failed: {e}");
                self.broken = true;
                false
            }
        }
    }

    /// TLS failed (a bad handshake, a client certificate refused, a corrupt record): send the
    /// alert rustls queued if the socket takes it, and drop the connection.
    fn tls_failed(&mut self, e: &std::io::Error) {
        tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: TLS: {e}");
        if let Some(tls) = self.tls.as_mut() {
            let _ = tls.flush(&mut self.stream);
        }
        self.broken = true;
    }

    /// The session's STARTTLS reply has left in plain text: put TLS under the session.
    /// Bytes already received past the option are the client's first TLS bytes.
    fn start_tls(&mut self) {
        self.tls_pending = false;
        let Some(config) = self.tls_config.clone() else {
            let e = std::io::Error::other("the session asked for TLS, which is not configured");
            return self.tls_failed(&e);
        };
        let early = &self.input[self.in_start..self.in_end];
        let started = TlsLayer::new(config, self.peer).and_then(|mut tls| {
            let fed = tls.feed(early);
            self.tls = Some(Box::new(tls));
            fed
        });
        self.in_start = 0;
        self.in_end = 0;
        if let Err(e) = started {
            self.tls_failed(&e);
        }
    }

    /// Write queued bytes to the socket until it takes no more.
    fn send_plain(&mut self) -> bool {
        let mut progress = false;
        let out = &self.actions.send;
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
        if self.tls.is_some() {
            return self.read_in_tls();
        }
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
        if progress {
            self.last_input = Instant::now();
        }
        progress
    }

    /// `read_in` through TLS: decrypted bytes land in the same receive buffer.
    fn read_in_tls(&mut self) -> bool {
        let mut got = 0;
        while got < READ_CHUNK && !self.closing && !self.broken {
            self.make_room();
            let Some(tls) = self.tls.as_mut() else {
                break;
            };
            match tls.receive(&mut self.stream, &mut self.input[self.in_end..]) {
                Ok(Received::Data(n)) => {
                    self.in_end += n;
                    got += n;
                }
                Ok(Received::Blocked) => break,
                Ok(Received::Closed) => {
                    self.closing = true;
                    tracing::debug!(peer = %self.peer, "peer closed");
                }
                Err(e) => self.tls_failed(&e),
            }
        }
        if got > 0 {
            self.last_input = Instant::now();
        }
        got > 0
    }

    /// Feed the unparsed input to the session (none while TLS is about to start: those
    /// bytes are the client's TLS handshake); with no input, only while the session waits
    /// for memory (an iSCSI session holds its waiting commands parsed: the call lets them
    /// retry).
    fn parse(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        let retry = self.in_start == self.in_end
            && self.with_session(|s, _| s.waiting_for_memory()) == Some(true);
        if (self.in_start == self.in_end && !retry) || self.broken || self.tls_pending {
            return false;
        }
        let (input, exports) = (std::mem::take(&mut self.input), self.exports.clone());
        let unparsed = &input[self.in_start..self.in_end];
        let r = self.with_session(|s, a| s.receive(unparsed, &*exports, a));
        self.input = input;
        let progress = match r {
            Some(Ok(n)) => {
                self.in_start += n;
                n > 0
            }
            Some(Err(e)) => {
                tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
                self.closing = true;
                self.in_start = 0;
                self.in_end = 0;
                false
            }
            None => false,
        };
        self.take_actions(ctx);
        if let Some(volume) = self.with_session(|s, _| s.volume_use()) {
            let session = &self.session;
            self.slot.set_volume(volume, || session.describe());
        }
        progress
    }

    /// Once a second: the session's keep-alives, then the handshake and idle timeouts.
    fn tick(&mut self, ctx: &mut PollCtx<'_>) {
        let now = Instant::now();
        self.last_tick = now;
        if let Some(Err(e)) = self.with_session(|s, a| s.tick(now, a)) {
            tracing::warn!(protocol = S::PROTOCOL, peer = %self.peer, "closing connection: {e}");
            self.closing = true;
        }
        self.take_actions(ctx);
        let registry = self.slot.registry.clone();
        let limits = &registry.limits;
        let handshaking = self.with_session(|s, _| s.handshaking()) == Some(true);
        if handshaking && now - self.opened >= limits.handshake_timeout {
            tracing::warn!(
                protocol = S::PROTOCOL,
                peer = %self.peer,
                "closing connection: handshake not finished within {:?} (limits.handshake_timeout)",
                limits.handshake_timeout
            );
            self.closing = true;
        }
        let quiet = self.in_flight == 0 && self.pending_out() == 0;
        if let Some(idle) = limits
            .idle_timeout
            .filter(|&d| quiet && now - self.last_input >= d)
        {
            tracing::info!(
                protocol = S::PROTOCOL,
                peer = %self.peer,
                "closing connection: silent for {idle:?} (limits.idle_timeout)"
            );
            self.closing = true;
        }
    }
}

impl<S: Session> Poller for Connection<S> {
    fn poll(&mut self, ctx: &mut PollCtx<'_>) -> bool {
        if self.poisoned {
            return false;
        }
        let mut progress = false;
        if ctx.stopping() && !self.stopping_seen {
            self.stopping_seen = true;
            self.with_session(|s, a| s.shut_down(a));
            self.closing = true;
            self.take_actions(ctx);
        }
        let waiting = self.with_session(|s, _| s.waiting_for_memory()) == Some(true);
        let backlog = waiting
            || self.tls_pending
            || self.in_flight >= MAX_IN_FLIGHT
            || self.pending_out() >= MAX_OUT;
        if !backlog && self.read_in() {
            progress = true;
        }
        progress |= self.parse(ctx);
        if self.last_tick.elapsed() >= Duration::from_secs(1) {
            self.tick(ctx);
        }
        // One send for the replies of every completion delivered since the last pass and
        // for what parsing produced.
        progress |= self.write_out();
        if self.tls_pending && self.pending_out() == 0 && !self.broken {
            self.start_tls();
            // The server's part of the handshake, when the client's start came early.
            self.write_out();
            progress = true;
        }
        progress
    }

    fn complete(&mut self, c: Completion, ctx: &mut PollCtx<'_>) {
        self.in_flight -= 1;
        self.slot
            .entry
            .in_flight
            .store(self.in_flight as u64, Ordering::Relaxed);
        // Only queue the reply: the reactor polls this connection later in the same pass,
        // and that poll writes all queued replies with one send.
        self.with_session(|s, a| s.complete(c, a));
        self.take_actions(ctx);
    }

    fn wait_fd(&self) -> Option<(i32, u32)> {
        if self.poisoned {
            return None;
        }
        let mut ev = libc::POLLIN as u32;
        if self.pending_out() > 0 || self.tls.as_ref().is_some_and(|t| t.wants_write()) {
            ev |= libc::POLLOUT as u32;
        }
        Some((self.stream.as_raw_fd(), ev))
    }

    fn finished(&self) -> bool {
        let tls_unsent = self.tls.as_ref().is_some_and(|t| t.wants_write());
        let done = (self.closing && self.pending_out() == 0 && !tls_unsent) || self.broken;
        done && self.in_flight == 0
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

/// Longest pause between accept attempts while accept fails (fds exhausted, say).
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accept connections on `listener` until `stop`, spreading them over reactors.
///
/// The loop never ends on an error: a failing accept (EMFILE while fds are exhausted)
/// is retried after a pause that doubles up to [`ACCEPT_BACKOFF_MAX`], logged at most every
/// few seconds; a connection over a limit is closed at once.
///
/// `tls` serves the sessions that ask for TLS (NBD with `[nbd.tls]`).
pub fn accept_loop<S: Session + 'static>(
    listener: std::net::TcpListener,
    engine: Engine,
    exports: Arc<dyn Exports + Send + Sync>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    registry: Arc<Registry>,
    tls: Option<Arc<rustls::ServerConfig>>,
    make: impl Fn() -> (S, Actions) + Send + 'static,
) {
    let mut next = 0usize;
    let mut backoff = Duration::ZERO;
    let mut failures = Throttle::new(Duration::from_secs(5));
    let mut refusals = Throttle::new(Duration::from_secs(5));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::Acquire) {
            break;
        }
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::ZERO;
                a
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), ACCEPT_BACKOFF_MAX);
                if let Some(held) = failures.pass() {
                    tracing::warn!(
                        protocol = S::PROTOCOL,
                        "accept failed: {e}; retrying with back-off ({held} more failures not logged)"
                    );
                }
                std::thread::sleep(backoff);
                continue;
            }
        };
        let slot = match registry.admit(S::PROTOCOL, peer, &stream) {
            Ok(slot) => slot,
            Err(why) => {
                if let Some(held) = refusals.pass() {
                    tracing::warn!(
                        protocol = S::PROTOCOL,
                        %peer,
                        "connection refused: {why} ({held} more refusals not logged)"
                    );
                }
                continue;
            }
        };
        let (session, greeting) = make();
        let tls = tls.clone();
        match Connection::new(stream, peer, session, greeting, exports.clone(), slot, tls) {
            Ok(c) => {
                engine.add_poller(next, Box::new(c));
                next = next.wrapping_add(1);
            }
            Err(e) => tracing::warn!(protocol = S::PROTOCOL, "connection setup failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicBool;
    use tessel_engine::{DeviceSpec, EngineConfig, FormatOptions, MemDisk, PollMode};

    /// Echoes what it receives; receiving '!' makes it panic, as a session bug would.
    struct Echo;

    impl Session for Echo {
        const PROTOCOL: &'static str = "echo";
        fn receive(
            &mut self,
            input: &[u8],
            _exports: &dyn Exports,
            actions: &mut Actions,
        ) -> Result<usize, String> {
            assert!(!input.contains(&b'!'), "a session bug");
            actions.send.extend_from_slice(input);
            Ok(input.len())
        }
        fn complete(&mut self, _c: Completion, _actions: &mut Actions) {}
        fn shut_down(&mut self, _actions: &mut Actions) {}
        fn handshaking(&self) -> bool {
            false
        }
        fn volume_use(&self) -> VolumeUse {
            VolumeUse::None
        }
        fn describe(&self) -> Described {
            Described::default()
        }
    }

    /// A one-reactor engine on a small in-memory pool.
    fn engine() -> Engine {
        let dev = [DeviceSpec::Mem(MemDisk::new(64 << 20, false))];
        let opts = FormatOptions {
            cluster_size: 16 << 10,
            shard_size: 1 << 20,
            journal_regions: 4,
            force: false,
        };
        Engine::format(&dev, &opts).unwrap();
        let cfg = EngineConfig {
            cores: vec![0],
            poll: PollMode::Adaptive,
            ring_entries: 64,
            pin: false,
            ..EngineConfig::default()
        };
        Engine::open(&dev, cfg).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            connections: 8,
            connections_per_client: 8,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: None,
        }
    }

    fn echoes(s: &mut TcpStream, text: &[u8]) -> bool {
        let mut back = vec![0; text.len()];
        s.write_all(text).is_ok() && s.read_exact(&mut back).is_ok() && back == text
    }

    #[test]
    fn a_session_panic_closes_only_its_connection() {
        let engine = engine();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Registry::new(limits());
        let stop = Arc::new(AtomicBool::new(false));
        let exports: Arc<dyn Exports + Send + Sync> = Arc::new(Vec::new());
        let accept = {
            let (engine, registry, stop) = (engine.clone(), registry.clone(), stop.clone());
            std::thread::spawn(move || {
                accept_loop(listener, engine, exports, stop, registry, None, || {
                    (Echo, Actions::default())
                })
            })
        };
        let connect = || {
            let s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        };
        let (mut bad, mut good) = (connect(), connect());
        assert!(echoes(&mut good, b"hello"));
        assert!(echoes(&mut bad, b"hello"));

        bad.write_all(b"!").unwrap();
        let mut byte = [0u8; 1];
        assert!(
            matches!(bad.read(&mut byte), Ok(0) | Err(_)),
            "the panicking session's connection is closed"
        );
        assert!(
            echoes(&mut good, b"still here"),
            "the other connection works"
        );
        let mut fresh = connect();
        assert!(
            echoes(&mut fresh, b"new"),
            "the reactor takes new connections"
        );
        assert!(!engine.reactor_panicked());
        let deadline = Instant::now() + Duration::from_secs(10);
        while registry.open() != 2 {
            assert!(
                Instant::now() < deadline,
                "{} connections open",
                registry.open()
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        stop.store(true, Ordering::Release);
        drop(connect());
        accept.join().unwrap();
        drop((good, fresh));
        engine.shutdown().unwrap();
    }

    /// A poller that panics in engine code, outside any session.
    struct Bomb;

    impl Poller for Bomb {
        fn poll(&mut self, _ctx: &mut PollCtx<'_>) -> bool {
            panic!("an engine bug");
        }
        fn complete(&mut self, _c: Completion, _ctx: &mut PollCtx<'_>) {}
        fn wait_fd(&self) -> Option<(i32, u32)> {
            None
        }
        fn finished(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_reactor_panic_is_reported_for_the_daemon_to_stop() {
        let engine = engine();
        assert!(!engine.reactor_panicked());
        engine.add_poller(0, Box::new(Bomb));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !engine.reactor_panicked() {
            assert!(Instant::now() < deadline, "the panic was not reported");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn connections_over_a_limit_are_refused_and_their_slots_come_back() {
        let registry = Registry::new(Limits {
            connections: 3,
            connections_per_client: 2,
            ..limits()
        });
        let (a, b): (SocketAddr, SocketAddr) = (
            "10.0.0.1:1000".parse().unwrap(),
            "10.0.0.2:1000".parse().unwrap(),
        );
        // The registry only keeps a handle on the socket; any connected one will do.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let a1 = registry.admit("nbd", a, &s).unwrap();
        let _a2 = registry.admit("nbd", a, &s).unwrap();
        assert!(registry
            .admit("nbd", a, &s)
            .err()
            .unwrap()
            .contains("connections_per_client"));
        let _iscsi = registry.admit("iscsi", a, &s).unwrap();
        let mut b1 = registry.admit("nbd", b, &s).unwrap();
        assert!(registry
            .admit("nbd", b, &s)
            .err()
            .unwrap()
            .contains("limits.connections"));
        b1.set_volume(VolumeUse::One(VolumeId(7)), Described::default);
        let on = |v| {
            registry
                .matching(|u| u == VolumeUse::One(VolumeId(v)))
                .len()
        };
        assert_eq!((on(7), on(8)), (1, 0));
        assert_eq!(registry.sessions().len(), 4);
        drop(a1);
        drop(b1);
        assert_eq!(on(7), 0);
        assert_eq!(registry.sessions().len(), 2);
        assert!(registry.admit("nbd", b, &s).is_ok());
    }
}
