//! One NBD connection as a state machine: received bytes and engine completions in, bytes to
//! send and engine requests out. All state changes go through `step`.

use tessel_engine::{AlignedBuf, BufPool, Completion, Op, Request, Slab};

use super::handshake::{self, Negotiation, OptionContext, OptionOutcome};
use super::proto::{Errno, OPT_EXPORT_NAME, REP_ERR_TOO_BIG};
use super::transmission::{self as tm, Admission, ReplyShape, Transmission, Work};
use super::{NbdConfig, NbdError};
use crate::budget::Allowance;
use crate::export::{Actions, Exports};

/// Where the connection is in the protocol.
enum State {
    /// Waiting for the client's flags word.
    ClientFlags,
    /// Option phase: waiting for a whole option (header and data).
    Options(Negotiation),
    /// Discarding the data of an option larger than the limit, then NBD_REP_ERR_TOO_BIG.
    SkipOption {
        negotiation: Negotiation,
        option: u32,
        remaining: u32,
    },
    /// Transmission: waiting for a request header.
    Requests(Transmission),
    /// Gathering a write's payload straight into its engine buffer.
    WritePayload {
        tx: Transmission,
        write: PendingWrite,
    },
    /// Discarding the payload of a refused write, then answering its error.
    SkipPayload {
        tx: Transmission,
        cookie: u64,
        refusal: (Errno, &'static str),
        remaining: u32,
    },
    /// NBD_CMD_DISC received: no more input; close once in-flight requests are answered.
    Disconnecting,
    /// NBD_OPT_ABORT answered or a protocol violation seen: input is ignored.
    Closed,
}

/// A write whose payload is arriving.
struct PendingWrite {
    cookie: u64,
    work: Work,
    buf: AlignedBuf,
    filled: usize,
    /// Bytes of the connection's allowance taken for the payload.
    held: u64,
}

/// A request handed to the engine and not yet answered.
struct InFlight {
    cookie: u64,
    shape: ReplyShape,
    structured: bool,
    /// Bytes of the connection's allowance taken for its data.
    held: u64,
}

/// Bytes of request buffers a connection keeps for reuse ...
const POOL_BYTES: usize = 8 << 20;
/// ... each of at most this capacity (larger ones go back to the allocator).
const POOL_BUF_CAP: usize = 128 << 10;

/// One NBD connection.
pub struct NbdSession {
    config: NbdConfig,
    state: State,
    /// Requests in the engine, keyed by their tag (a slot reused once answered).
    in_flight: Slab<InFlight>,
    /// Engine buffers handed back by completions, reused for the next reads and writes
    /// (no allocation or zeroing per request: a write's payload and a read's data, or
    /// the engine's zero fill, cover every byte of the buffer).
    pool: BufPool,
    shutting_down: bool,
    /// Read data and write payloads this connection may hold: a request that does not
    /// fit waits, unparsed, until completions and sent replies give bytes back.
    allowance: Allowance,
    /// Allowance bytes held by read replies still queued to send.
    unsent: u64,
    /// The last request seen did not fit the allowance and waits.
    waiting: bool,
}

impl NbdSession {
    /// New connection: the session writes the server greeting into actions.send.
    pub fn new(config: NbdConfig, actions: &mut Actions) -> NbdSession {
        handshake::put_greeting(&mut actions.send);
        NbdSession {
            config,
            state: State::ClientFlags,
            in_flight: Slab::default(),
            pool: BufPool::new(POOL_BYTES, POOL_BUF_CAP),
            shutting_down: false,
            allowance: Allowance::unlimited(),
            unsent: 0,
            waiting: false,
        }
    }

    /// Hold read data and write payloads within `allowance` (the default has no limit).
    pub fn with_allowance(mut self, allowance: Allowance) -> NbdSession {
        self.allowance = allowance;
        self
    }

    /// True while a request waits for memory: the driver should stop reading input until
    /// completions or sent replies free some (and call `receive` again then).
    pub fn waiting_for_memory(&self) -> bool {
        self.waiting
    }

    /// The driver still has `bytes` queued to send: read replies beyond that have left,
    /// and their allowance goes back.
    pub fn queued(&mut self, bytes: usize) {
        let left = self.unsent.min(bytes as u64);
        self.allowance.give(self.unsent - left);
        self.unsent = left;
    }

    /// The export's volume once the handshake chose one.
    pub fn volume(&self) -> Option<tessel_engine::VolumeId> {
        match &self.state {
            State::Requests(tx)
            | State::WritePayload { tx, .. }
            | State::SkipPayload { tx, .. } => Some(tx.export.volume),
            _ => None,
        }
    }

    /// The export's name once the handshake chose one.
    pub fn export_name(&self) -> Option<&str> {
        match &self.state {
            State::Requests(tx)
            | State::WritePayload { tx, .. }
            | State::SkipPayload { tx, .. } => Some(&tx.export.name),
            _ => None,
        }
    }

    /// True while a write's payload is being gathered (its bytes held from the allowance).
    #[cfg(test)]
    pub(crate) fn gathering_payload(&self) -> bool {
        matches!(self.state, State::WritePayload { .. })
    }

    /// True until the client has chosen an export (NBD_OPT_GO or NBD_OPT_EXPORT_NAME).
    pub fn handshaking(&self) -> bool {
        matches!(
            self.state,
            State::ClientFlags | State::Options(_) | State::SkipOption { .. }
        )
    }

    /// Feed received bytes; returns how many were consumed (the driver keeps the rest and
    /// calls again when more arrive). Err = protocol violation: close the connection after
    /// sending what `actions.send` holds.
    pub fn receive(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, NbdError> {
        let mut consumed = 0;
        // Past an acknowledged NBD_OPT_STARTTLS the bytes are the client's TLS handshake:
        // they are the driver's, not options.
        while consumed < input.len() && !actions.start_tls {
            match self.step(&input[consumed..], exports, actions)? {
                0 => break,
                n => consumed += n,
            }
        }
        Ok(consumed)
    }

    /// An engine request finished (tag = the tag the session put in the Request).
    pub fn complete(&mut self, completion: Completion, actions: &mut Actions) {
        let slot = usize::try_from(completion.tag).ok();
        let Some(req) = slot.and_then(|t| self.in_flight.remove(t)) else {
            tracing::warn!(
                tag = completion.tag,
                "nbd: completion for an unknown tag ignored"
            );
            return;
        };
        let out = &mut actions.send;
        let read_ok = completion.result.is_ok() && matches!(req.shape, ReplyShape::Read { .. });
        if read_ok {
            // The data now waits in the reply: its allowance goes back once sent (`queued`).
            self.unsent += req.held;
        } else {
            self.allowance.give(req.held);
        }
        match (completion.result, req.shape, &completion.buf) {
            (Err(e), _, _) => {
                tm::put_error(out, req.structured, req.cookie, (&e).into(), &e.to_string())
            }
            (Ok(()), ReplyShape::Status, _) => tm::put_success(out, req.structured, req.cookie),
            (
                Ok(()),
                ReplyShape::Read {
                    offset,
                    len,
                    skip,
                    chunk,
                },
                Some(buf),
            ) if buf.len() >= skip as usize + len as usize => {
                let data = &buf.as_slice()[skip as usize..][..len as usize];
                tm::put_read(out, req.structured, req.cookie, offset, data, chunk)
            }
            (Ok(()), ReplyShape::Read { .. }, _) => {
                let message = "engine returned no data of the requested length";
                tm::put_error(out, req.structured, req.cookie, Errno::Io, message)
            }
            (Ok(()), ReplyShape::BlockStatus(query), _) => {
                let descriptors = tm::descriptors(&completion.extents, query);
                tm::put_block_status(out, req.cookie, &descriptors)
            }
        }
        if let Some(buf) = completion.buf {
            self.pool.put(buf);
        }
        if matches!(self.state, State::Disconnecting) && self.in_flight.is_empty() {
            actions.close = true;
        }
    }

    /// The daemon is shutting down: new commands get ESHUTDOWN, in-flight ones finish.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Number of engine requests in flight (the driver waits for 0 before closing).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The one transition function: consume a prefix of `input` (0 = wait for more bytes,
    /// state unchanged) and move to the next state.
    fn step(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<usize, NbdError> {
        let state = std::mem::replace(&mut self.state, State::Closed);
        let (next, used) = match state {
            State::ClientFlags => match input.first_chunk() {
                Some(flags) => (
                    State::Options(handshake::parse_client_flags(*flags)?),
                    flags.len(),
                ),
                None => (State::ClientFlags, 0),
            },
            State::Options(negotiation) => self.option(negotiation, input, exports, actions)?,
            State::SkipOption {
                negotiation,
                option,
                remaining,
            } => {
                let n = remaining.min(input.len() as u32);
                if n == remaining {
                    handshake::put_option_reply(&mut actions.send, option, REP_ERR_TOO_BIG, &[]);
                    (State::Options(negotiation), n as usize)
                } else {
                    let remaining = remaining - n;
                    (
                        State::SkipOption {
                            negotiation,
                            option,
                            remaining,
                        },
                        n as usize,
                    )
                }
            }
            State::Requests(tx) => self.request(tx, input, actions)?,
            State::WritePayload { tx, mut write } => {
                let n = (write.buf.len() - write.filled).min(input.len());
                write.buf.as_mut_slice()[write.filled..][..n].copy_from_slice(&input[..n]);
                write.filled += n;
                if write.filled < write.buf.len() {
                    (State::WritePayload { tx, write }, n)
                } else {
                    let (cookie, work, held) = (write.cookie, write.work, write.held);
                    self.submit(&tx, cookie, work, Some(write.buf), held, actions);
                    (State::Requests(tx), n)
                }
            }
            State::SkipPayload {
                tx,
                cookie,
                refusal,
                remaining,
            } => {
                let n = remaining.min(input.len() as u32);
                if n == remaining {
                    tm::put_error(
                        &mut actions.send,
                        tx.structured,
                        cookie,
                        refusal.0,
                        refusal.1,
                    );
                    (State::Requests(tx), n as usize)
                } else {
                    let remaining = remaining - n;
                    (
                        State::SkipPayload {
                            tx,
                            cookie,
                            refusal,
                            remaining,
                        },
                        n as usize,
                    )
                }
            }
            State::Disconnecting => (State::Disconnecting, input.len()),
            State::Closed => (State::Closed, input.len()),
        };
        self.state = next;
        Ok(used)
    }

    /// Option phase: answer one whole option, or skip one that is too large.
    fn option(
        &mut self,
        mut negotiation: Negotiation,
        input: &[u8],
        exports: &dyn Exports,
        actions: &mut Actions,
    ) -> Result<(State, usize), NbdError> {
        let Some(header) = input.first_chunk() else {
            return Ok((State::Options(negotiation), 0));
        };
        let header = handshake::parse_option_header(header)?;
        let (option, len) = (header.option, header.len);
        if len > self.config.max_option_len {
            if option == OPT_EXPORT_NAME {
                let max = self.config.max_option_len;
                return Err(NbdError::ExportNameTooLong { len, max });
            }
            let remaining = len;
            let skip = State::SkipOption {
                negotiation,
                option,
                remaining,
            };
            return Ok((skip, handshake::OPTION_HEADER_LEN));
        }
        let total = handshake::OPTION_HEADER_LEN + len as usize;
        let Some(data) = input.get(handshake::OPTION_HEADER_LEN..total) else {
            return Ok((State::Options(negotiation), 0));
        };
        let ctx = OptionContext {
            exports,
            config: &self.config,
            shutting_down: self.shutting_down,
        };
        let next = match negotiation.answer(option, data, &ctx, &mut actions.send)? {
            OptionOutcome::Continue => State::Options(negotiation),
            OptionOutcome::Abort => {
                actions.close = true;
                State::Closed
            }
            OptionOutcome::StartTls => {
                actions.start_tls = true;
                State::Options(negotiation)
            }
            OptionOutcome::Transmit(tx) => State::Requests(tx),
        };
        Ok((next, total))
    }

    /// Transmission phase: decode one request header and act on it.
    fn request(
        &mut self,
        tx: Transmission,
        input: &[u8],
        actions: &mut Actions,
    ) -> Result<(State, usize), NbdError> {
        let Some(header) = input.first_chunk() else {
            return Ok((State::Requests(tx), 0));
        };
        let h = tm::parse_request_header(header)?;
        let used = tm::REQUEST_HEADER_LEN;
        // A client held to the maximum payload broke the protocol; one that negotiated
        // nothing gets EINVAL after its payload is skipped (see `Transmission::check`).
        if tx.strict && h.payload_len() > self.config.max_payload {
            let max = self.config.max_payload;
            return Err(NbdError::PayloadTooBig { len: h.len, max });
        }
        let admission = tx.admit(&h, &self.config, self.shutting_down);
        // Data a request makes the connection hold (a read's buffer and reply, a write's
        // payload) is taken from the allowance before any buffer exists; a request that
        // does not fit stays unparsed until bytes come back.
        let held = match &admission {
            Admission::Submit(work) if matches!(work.op, Op::Read) => work.len,
            Admission::Submit(_) => u64::from(h.payload_len()),
            _ => 0,
        };
        self.waiting = held > 0 && !self.allowance.try_take(held);
        if self.waiting {
            return Ok((State::Requests(tx), 0));
        }
        let next = match admission {
            Admission::Submit(work) if h.payload_len() > 0 => {
                let buf = self.pool.take(h.payload_len() as usize);
                let write = PendingWrite {
                    cookie: h.cookie,
                    work,
                    buf,
                    filled: 0,
                    held,
                };
                State::WritePayload { tx, write }
            }
            Admission::Submit(work) => {
                let buf = matches!(work.op, Op::Read).then(|| self.pool.take(work.len as usize));
                self.submit(&tx, h.cookie, work, buf, held, actions);
                State::Requests(tx)
            }
            Admission::Reject(errno, reason) if h.payload_len() > 0 => State::SkipPayload {
                tx,
                cookie: h.cookie,
                refusal: (errno, reason),
                remaining: h.payload_len(),
            },
            Admission::Reject(errno, reason) => {
                tm::put_error(&mut actions.send, tx.structured, h.cookie, errno, reason);
                State::Requests(tx)
            }
            Admission::Succeed => {
                tm::put_success(&mut actions.send, tx.structured, h.cookie);
                State::Requests(tx)
            }
            Admission::Disconnect => {
                actions.close |= self.in_flight.is_empty();
                State::Disconnecting
            }
        };
        Ok((next, used))
    }

    /// Hand one request to the engine and remember how to answer it.
    fn submit(
        &mut self,
        tx: &Transmission,
        cookie: u64,
        work: Work,
        buf: Option<AlignedBuf>,
        held: u64,
        actions: &mut Actions,
    ) {
        let (structured, shape) = (tx.structured, work.shape);
        let entry = InFlight {
            cookie,
            shape,
            structured,
            held,
        };
        let tag = self.in_flight.insert(entry) as u64;
        actions.submit.push(Request {
            tag,
            volume: tx.export.volume,
            op: work.op,
            offset: work.offset,
            len: work.len,
            buf,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use crate::nbd::testing::*;
    use proptest::prelude::*;

    #[test]
    fn oversized_option_answers_err_too_big_after_skipping_its_data() {
        let mut c = Client::negotiated(true);
        let big = vec![7u8; 100 << 10];
        for piece in option_bytes(OPT_LIST, &big).chunks(4000) {
            c.send(piece);
        }
        assert_eq!(
            parse_option_replies(&c.take()),
            vec![(OPT_LIST, REP_ERR_TOO_BIG, vec![])]
        );
        assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn options_wait_until_their_data_has_arrived() {
        let mut c = Client::negotiated(true);
        let bytes = option_bytes(OPT_LIST, &[]);
        let n = c
            .session
            .receive(&bytes[..10], &c.exports, &mut c.actions)
            .unwrap();
        assert_eq!(n, 0);
        c.send(&bytes);
        assert_eq!(parse_option_replies(&c.take()).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn write_then_read_round_trips_through_simple_replies() {
        let mut c = Client::go("vol0", false, false);
        let payload: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = request_bytes(CMD_WRITE, 0, 1, 4096, 8192);
        bytes.extend_from_slice(&payload);
        for piece in bytes.chunks(1000) {
            c.send(piece);
        }
        assert_eq!(c.actions.submit[0].op, Op::Write { fua: false });
        c.run_engine();
        assert_eq!(simple(&c.take()), (0, 1));
        c.request(CMD_READ, 0, 2, 4096, 8192);
        c.run_engine();
        let reply = c.take();
        assert_eq!(simple(&reply), (0, 2));
        assert_eq!(&reply[16..], &payload[..]);
    }

    #[test]
    fn oversized_write_payload_is_a_protocol_error() {
        let mut c = Client::go("vol0", false, false);
        let bytes = request_bytes(CMD_WRITE, 0, 1, 0, (32 << 20) + 512);
        let err = c
            .session
            .receive(&bytes, &c.exports, &mut c.actions)
            .unwrap_err();
        assert_eq!(
            err,
            NbdError::PayloadTooBig {
                len: (32 << 20) + 512,
                max: 32 << 20
            }
        );
    }

    #[test]
    fn bad_request_magic_is_a_protocol_error() {
        let mut c = Client::go("vol0", false, false);
        let err = c
            .session
            .receive(&[0u8; 28], &c.exports, &mut c.actions)
            .unwrap_err();
        assert_eq!(err, NbdError::BadRequestMagic(0));
    }

    #[test]
    fn replies_follow_completion_order_not_request_order() {
        let mut c = Client::go("vol0", false, false);
        for cookie in 1..=3 {
            c.request(CMD_READ, 0, cookie, 0, 512);
        }
        assert_eq!(c.session.in_flight(), 3);
        let mut requests = std::mem::take(&mut c.actions.submit);
        requests.reverse();
        for r in requests {
            let completion = c.memory.execute(r);
            c.session.complete(completion, &mut c.actions);
        }
        let reply = c.take();
        let cookies: Vec<u64> = reply.chunks(16 + 512).map(|r| simple(r).1).collect();
        assert_eq!(cookies, [3, 2, 1]);
        assert_eq!(c.session.in_flight(), 0);
    }

    #[test]
    fn reused_buffers_carry_no_old_bytes_into_replies() {
        let mut c = Client::go("vol0", false, false);
        c.write(1, 0, &[0xee; 4096]);
        c.run_engine();
        c.request(CMD_READ, 0, 2, 0, 4096);
        c.run_engine();
        assert_eq!(c.session.pool.len(), 1);
        // The pooled buffer holds 0xee; a read of never-written blocks and a shorter write
        // through it must see only their own bytes.
        c.request(CMD_READ, 0, 3, 8192, 4096);
        c.run_engine();
        c.write(4, 16384, &[0x11; 512]);
        c.run_engine();
        c.request(CMD_READ, 0, 5, 16384, 1024);
        c.run_engine();
        let reply = c.take();
        let (first, rest) = reply.split_at(16);
        assert_eq!(simple(first), (0, 1));
        let (read2, rest) = rest.split_at(16 + 4096);
        assert_eq!(simple(read2), (0, 2));
        assert!(read2[16..].iter().all(|&b| b == 0xee));
        let (read3, rest) = rest.split_at(16 + 4096);
        assert_eq!(simple(read3), (0, 3));
        assert!(read3[16..].iter().all(|&b| b == 0));
        assert_eq!(simple(&rest[..16]), (0, 4));
        let read5 = &rest[16..];
        assert_eq!(simple(read5), (0, 5));
        assert!(read5[16..16 + 512].iter().all(|&b| b == 0x11));
        assert!(read5[16 + 512..].iter().all(|&b| b == 0));
        assert_eq!(c.session.in_flight(), 0);
    }

    #[test]
    fn reads_beyond_the_allowance_wait_unparsed_until_their_replies_leave() {
        let budget = crate::budget::MemoryBudget::new(1 << 30);
        let mut c = Client::go("vol0", false, false);
        c.session = std::mem::replace(
            &mut c.session,
            NbdSession::new(NbdConfig::default(), &mut Actions::default()),
        )
        .with_allowance(Allowance::new(budget.clone(), 128 << 10));
        let mut reads = Vec::new();
        for cookie in 1..=4u64 {
            reads.extend(request_bytes(CMD_READ, 0, cookie, 0, 64 << 10));
        }
        let n = c
            .session
            .receive(&reads, &c.exports, &mut c.actions)
            .unwrap();
        assert_eq!(n, 2 * tm::REQUEST_HEADER_LEN, "two 64K reads fit in 128K");
        assert!(c.session.waiting_for_memory());
        assert_eq!(budget.used(), 128 << 10);
        c.run_engine();
        // Replies queued and unsent still hold their bytes.
        c.session.queued(c.actions.send.len());
        let m = c
            .session
            .receive(&reads[n..], &c.exports, &mut c.actions)
            .unwrap();
        assert_eq!(m, 0);
        // Sent: the next two go.
        c.take();
        c.session.queued(0);
        let m = c
            .session
            .receive(&reads[n..], &c.exports, &mut c.actions)
            .unwrap();
        assert_eq!(m, 2 * tm::REQUEST_HEADER_LEN);
        assert!(!c.session.waiting_for_memory());
        c.run_engine();
        c.take();
        c.session.queued(0);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn disc_closes_after_in_flight_requests_finish() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_READ, 0, 1, 0, 512);
        c.request(CMD_DISC, 0, 2, 0, 0);
        c.send(b"ignored");
        assert!(!c.actions.close);
        c.run_engine();
        assert!(c.actions.close);
        assert_eq!(simple(&c.take()), (0, 1));
    }

    #[test]
    fn after_shut_down_new_commands_get_eshutdown_and_in_flight_ones_finish() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_READ, 0, 1, 0, 512);
        c.session.shut_down();
        c.request(CMD_READ, 0, 2, 0, 512);
        assert_eq!(simple(&c.take()), (Errno::Shutdown.code(), 2));
        c.run_engine();
        assert_eq!(simple(&c.take()), (0, 1));
        let mut o = Client::negotiated(true);
        o.session.shut_down();
        assert_eq!(
            o.option(OPT_GO, &go_data("vol0", &[]))[0].1,
            REP_ERR_SHUTDOWN
        );
    }

    #[test]
    fn unknown_client_flags_are_a_protocol_error() {
        let mut c = Client::connect(exports());
        let err = c
            .session
            .receive(&[0, 0, 0, 0x10], &c.exports, &mut c.actions);
        assert_eq!(err, Err(NbdError::UnknownClientFlags(0x10)));
    }

    /// A valid client conversation: handshake, a write, reads and a disconnect.
    fn conversation() -> Vec<u8> {
        let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        b.extend(option_bytes(OPT_STRUCTURED_REPLY, &[]));
        b.extend(option_bytes(
            OPT_SET_META_CONTEXT,
            &meta_data("vol0", &[BASE_ALLOCATION]),
        ));
        b.extend(option_bytes(OPT_GO, &go_data("vol0", &[INFO_BLOCK_SIZE])));
        b.extend(request_bytes(CMD_WRITE, 0, 1, 0, 1024));
        b.extend((0..1024).map(|i| i as u8));
        b.extend(request_bytes(CMD_READ, 0, 2, 0, 1024));
        b.extend(request_bytes(CMD_BLOCK_STATUS, 0, 3, 0, 8192));
        b.extend(request_bytes(CMD_DISC, 0, 4, 0, 0));
        b
    }

    /// Feed `bytes` in pieces as a driver would (keeping unconsumed bytes), completing
    /// engine requests as they appear; returns everything sent, or the protocol error.
    fn drive(pieces: &[usize], bytes: &[u8]) -> (Vec<u8>, Option<NbdError>) {
        let mut c = Client::connect(exports());
        let (mut pending, mut rest) = (Vec::new(), bytes);
        let mut sizes = pieces.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap()).clamp(1, rest.len());
            pending.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            match c.session.receive(&pending, &c.exports, &mut c.actions) {
                Ok(used) => drop(pending.drain(..used)),
                Err(e) => return (c.take(), Some(e)),
            }
            c.run_engine();
        }
        (c.take(), None)
    }

    proptest! {
        #[test]
        fn any_split_of_a_conversation_gives_the_same_replies(
            pieces in proptest::collection::vec(1usize..64, 1..8)
        ) {
            let whole = drive(&[usize::MAX], &conversation());
            prop_assert_eq!(drive(&pieces, &conversation()), whole);
        }

        #[test]
        fn random_bytes_in_any_phase_never_panic(
            prefix_len in 0usize..400,
            garbage in proptest::collection::vec(any::<u8>(), 0..600),
            pieces in proptest::collection::vec(1usize..200, 1..6),
        ) {
            let mut bytes = conversation();
            bytes.truncate(prefix_len.min(bytes.len()));
            bytes.extend_from_slice(&garbage);
            drive(&pieces, &bytes);
        }

        #[test]
        fn random_requests_after_go_never_panic(
            requests in proptest::collection::vec(
                (0u16..10, any::<u16>(), any::<u64>(), prop_oneof![any::<u64>(), 0u64..SIZE + 8192],
                 prop_oneof![any::<u32>(), 0u32..20000]),
                1..20),
            structured in any::<bool>(),
        ) {
            let mut c = Client::go("vol0", structured, structured);
            for (kind, flags, cookie, offset, len) in requests {
                let mut bytes = request_bytes(kind, flags, cookie, offset, len);
                if kind == CMD_WRITE && len <= 20000 {
                    bytes.resize(bytes.len() + len as usize, 0x5a);
                }
                let _ = c.session.receive(&bytes, &c.exports, &mut c.actions);
                c.run_engine();
            }
        }
    }
}
