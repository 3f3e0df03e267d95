//! One NBD connection as a state machine: received bytes and engine completions in, bytes to
//! send and engine requests out. All state changes go through `step`.

use std::collections::HashMap;

use tessel_engine::{AlignedBuf, Completion, Op, Request};

use super::handshake::{self, Negotiation, OptionContext, OptionOutcome};
use super::proto::{Errno, OPT_EXPORT_NAME, REP_ERR_TOO_BIG};
use super::transmission::{self as tm, Admission, ReplyShape, Transmission, Work};
use super::{NbdConfig, NbdError};
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
}

/// A request handed to the engine and not yet answered.
struct InFlight {
    cookie: u64,
    shape: ReplyShape,
    structured: bool,
}

/// One NBD connection.
pub struct NbdSession {
    config: NbdConfig,
    state: State,
    in_flight: HashMap<u64, InFlight>,
    next_tag: u64,
    shutting_down: bool,
}

impl NbdSession {
    /// New connection: the session writes the server greeting into actions.send.
    pub fn new(config: NbdConfig, actions: &mut Actions) -> NbdSession {
        handshake::put_greeting(&mut actions.send);
        NbdSession {
            config,
            state: State::ClientFlags,
            in_flight: HashMap::new(),
            next_tag: 0,
            shutting_down: false,
        }
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
        while consumed < input.len() {
            match self.step(&input[consumed..], exports, actions)? {
                0 => break,
                n => consumed += n,
            }
        }
        Ok(consumed)
    }

    /// An engine request finished (tag = the tag the session put in the Request).
    pub fn complete(&mut self, completion: Completion, actions: &mut Actions) {
        let Some(req) = self.in_flight.remove(&completion.tag) else {
            tracing::warn!(
                tag = completion.tag,
                "nbd: completion for an unknown tag ignored"
            );
            return;
        };
        let out = &mut actions.send;
        match (completion.result, req.shape, completion.buf) {
            (Err(e), _, _) => {
                tm::put_error(out, req.structured, req.cookie, (&e).into(), &e.to_string())
            }
            (Ok(()), ReplyShape::Status, _) => tm::put_success(out, req.structured, req.cookie),
            (Ok(()), ReplyShape::Read { offset, len }, Some(buf)) if buf.len() == len as usize => {
                tm::put_read(out, req.structured, req.cookie, offset, buf.as_slice())
            }
            (Ok(()), ReplyShape::Read { .. }, _) => {
                let message = "engine returned no data of the requested length";
                tm::put_error(out, req.structured, req.cookie, Errno::Io, message)
            }
            (
                Ok(()),
                ReplyShape::BlockStatus {
                    offset,
                    len,
                    req_one,
                },
                _,
            ) => {
                let descriptors = tm::descriptors(&completion.extents, offset, len, req_one);
                tm::put_block_status(out, req.cookie, &descriptors)
            }
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
                    let (cookie, work) = (write.cookie, write.work);
                    self.submit(&tx, cookie, work, Some(write.buf), actions);
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
        if h.payload_len() > self.config.max_payload {
            let max = self.config.max_payload;
            return Err(NbdError::PayloadTooBig { len: h.len, max });
        }
        let next = match tx.admit(&h, &self.config, self.shutting_down) {
            Admission::Submit(work) if h.payload_len() > 0 => {
                let buf = AlignedBuf::zeroed(h.payload_len() as usize);
                let write = PendingWrite {
                    cookie: h.cookie,
                    work,
                    buf,
                    filled: 0,
                };
                State::WritePayload { tx, write }
            }
            Admission::Submit(work) => {
                let buf =
                    matches!(work.op, Op::Read).then(|| AlignedBuf::zeroed(work.len as usize));
                self.submit(&tx, h.cookie, work, buf, actions);
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
        actions: &mut Actions,
    ) {
        let tag = self.next_tag;
        self.next_tag += 1;
        let (structured, shape) = (tx.structured, work.shape);
        self.in_flight.insert(
            tag,
            InFlight {
                cookie,
                shape,
                structured,
            },
        );
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
    use crate::export::ExportInfo;
    use crate::nbd::proto::*;
    use proptest::prelude::*;
    use tessel_engine::{Extent, IoError, VolumeId};

    const SIZE: u64 = 1 << 20;

    fn exports() -> Vec<ExportInfo> {
        let export = |name: &str, volume, block_size, read_only| ExportInfo {
            name: name.into(),
            description: format!("{name} described"),
            volume: VolumeId(volume),
            size: SIZE,
            block_size,
            read_only,
        };
        vec![
            export("vol0", 1, 512, false),
            export("vol0@snap", 2, 4096, true),
        ]
    }

    /// A volume in memory with 4 KiB allocation granularity, executing engine requests.
    struct Memory {
        data: Vec<u8>,
        allocated: Vec<bool>,
        fail_with: Option<IoError>,
    }

    impl Memory {
        fn new() -> Memory {
            let blocks = (SIZE / 4096) as usize;
            Memory {
                data: vec![0; SIZE as usize],
                allocated: vec![false; blocks],
                fail_with: None,
            }
        }

        fn execute(&mut self, mut r: Request) -> Completion {
            let range = r.offset as usize..(r.offset + r.len) as usize;
            let blocks = range.start / 4096..range.end.div_ceil(4096);
            let mut extents = Vec::new();
            let result = match (self.fail_with.clone(), r.op) {
                (Some(e), _) => Err(e),
                (None, Op::Read) => {
                    r.buf
                        .as_mut()
                        .unwrap()
                        .as_mut_slice()
                        .copy_from_slice(&self.data[range]);
                    Ok(())
                }
                (None, Op::Write { .. }) => {
                    self.data[range].copy_from_slice(r.buf.as_ref().unwrap().as_slice());
                    self.allocated[blocks].fill(true);
                    Ok(())
                }
                (None, Op::Trim | Op::WriteZeroes { .. }) => {
                    self.data[range].fill(0);
                    self.allocated[blocks].fill(false);
                    Ok(())
                }
                (None, Op::Flush) => Ok(()),
                (None, Op::BlockStatus) => {
                    for b in blocks {
                        let (offset, len) = (b as u64 * 4096, 4096);
                        extents.push(Extent {
                            offset,
                            len,
                            allocated: self.allocated[b],
                        });
                    }
                    Ok(())
                }
            };
            Completion {
                tag: r.tag,
                result,
                buf: r.buf,
                extents,
            }
        }
    }

    /// A client talking to a session through bytes, with the engine in memory.
    struct Client {
        session: NbdSession,
        actions: Actions,
        exports: Vec<ExportInfo>,
        memory: Memory,
    }

    impl Client {
        fn connect(exports: Vec<ExportInfo>) -> Client {
            let mut actions = Actions::default();
            let session = NbdSession::new(NbdConfig::default(), &mut actions);
            assert_eq!(&actions.send[..8], b"NBDMAGIC");
            actions.send.clear();
            Client {
                session,
                actions,
                exports,
                memory: Memory::new(),
            }
        }

        /// Connected, with the client's flags sent.
        fn negotiated(no_zeroes: bool) -> Client {
            let mut c = Client::connect(exports());
            let no_zeroes = if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
            c.send(&(FLAG_C_FIXED_NEWSTYLE | no_zeroes).to_be_bytes());
            c
        }

        /// Fed in one piece; asserts that everything was consumed.
        fn send(&mut self, bytes: &[u8]) {
            let n = self
                .session
                .receive(bytes, &self.exports, &mut self.actions)
                .unwrap();
            assert_eq!(n, bytes.len());
        }

        fn take(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.actions.send)
        }

        /// Send an option and decode its replies: (option, reply type, data).
        fn option(&mut self, option: u32, data: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
            self.send(&option_bytes(option, data));
            parse_option_replies(&self.take())
        }

        /// Handshake to transmission on `name` via NBD_OPT_GO.
        fn go(name: &str, structured: bool, meta: bool) -> Client {
            Client::go_on(exports(), name, structured, meta)
        }

        fn go_on(exports: Vec<ExportInfo>, name: &str, structured: bool, meta: bool) -> Client {
            let mut c = Client::connect(exports);
            c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
            if structured {
                assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].1, REP_ACK);
            }
            if meta {
                let replies = c.option(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION]));
                assert_eq!(replies.last().unwrap().1, REP_ACK);
            }
            let replies = c.option(OPT_GO, &go_data(name, &[]));
            assert_eq!(replies.last().unwrap().1, REP_ACK, "{replies:?}");
            c
        }

        fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
            self.send(&request_bytes(kind, flags, cookie, offset, len));
        }

        /// Complete every submitted request in submission order.
        fn run_engine(&mut self) {
            for r in std::mem::take(&mut self.actions.submit) {
                let completion = self.memory.execute(r);
                self.session.complete(completion, &mut self.actions);
            }
        }
    }

    fn option_bytes(option: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        requests
            .iter()
            .for_each(|r| d.extend_from_slice(&r.to_be_bytes()));
        d
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    fn request_bytes(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn be32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    fn be64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    fn parse_option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut replies = Vec::new();
        while !b.is_empty() {
            assert_eq!(be64(b), REP_MAGIC);
            let len = be32(&b[16..]) as usize;
            replies.push((be32(&b[8..]), be32(&b[12..]), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        replies
    }

    /// A simple reply: (error, cookie); any data follows its 16 bytes.
    fn simple(b: &[u8]) -> (u32, u64) {
        assert_eq!(be32(b), SIMPLE_REPLY_MAGIC);
        (be32(&b[4..]), be64(&b[8..]))
    }

    /// Structured chunks: (flags, type, cookie, payload).
    fn chunks(mut b: &[u8]) -> Vec<(u16, u16, u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be32(b), STRUCTURED_REPLY_MAGIC);
            let flags = u16::from_be_bytes([b[4], b[5]]);
            let kind = u16::from_be_bytes([b[6], b[7]]);
            let len = be32(&b[16..]) as usize;
            out.push((flags, kind, be64(&b[8..]), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    #[test]
    fn go_reports_size_flags_name_and_block_sizes_then_enters_transmission() {
        let mut c = Client::negotiated(true);
        let replies = c.option(OPT_GO, &go_data("vol0", &[INFO_NAME, INFO_DESCRIPTION]));
        let info = |kind: u16| {
            let r = replies
                .iter()
                .find(|r| r.1 == REP_INFO && r.2[..2] == kind.to_be_bytes());
            r.unwrap().2[2..].to_vec()
        };
        assert_eq!(be64(&info(INFO_EXPORT)), SIZE);
        let flags = u16::from_be_bytes(info(INFO_EXPORT)[8..10].try_into().unwrap());
        let expected = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_TRIM;
        assert_eq!(flags & expected, expected);
        assert_ne!(
            flags & (FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE | FLAG_SEND_FAST_ZERO),
            0
        );
        assert_eq!(info(INFO_NAME), b"vol0");
        assert_eq!(info(INFO_DESCRIPTION), b"vol0 described");
        let sizes = info(INFO_BLOCK_SIZE);
        assert_eq!(
            [be32(&sizes), be32(&sizes[4..]), be32(&sizes[8..])],
            [512, 4096, 32 << 20]
        );
        assert_eq!(replies.last().unwrap(), &(OPT_GO, REP_ACK, vec![]));
        c.request(CMD_FLUSH, 0, 5, 0, 0);
        assert_eq!(c.actions.submit.len(), 1);
    }

    #[test]
    fn go_with_unknown_export_answers_err_unknown_and_stays_in_options() {
        let mut c = Client::negotiated(true);
        assert_eq!(
            c.option(OPT_GO, &go_data("nope", &[])),
            vec![(OPT_GO, REP_ERR_UNKNOWN, vec![])]
        );
        assert_eq!(
            c.option(OPT_INFO, &go_data("nope", &[]))[0].1,
            REP_ERR_UNKNOWN
        );
        assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn info_leaves_the_session_in_the_option_phase() {
        let mut c = Client::negotiated(true);
        assert_eq!(
            c.option(OPT_INFO, &go_data("vol0", &[])).last().unwrap().1,
            REP_ACK
        );
        assert_eq!(c.option(OPT_LIST, &[]).last().unwrap().1, REP_ACK);
    }

    #[test]
    fn empty_export_name_serves_the_first_export() {
        let mut c = Client::negotiated(true);
        let replies = c.option(OPT_GO, &go_data("", &[INFO_NAME]));
        assert!(replies
            .iter()
            .any(|r| r.1 == REP_INFO && r.2 == [&[0, 1][..], b"vol0"].concat()));
    }

    #[test]
    fn read_only_snapshot_advertises_read_only_and_its_block_size() {
        let mut c = Client::negotiated(true);
        let replies = c.option(OPT_GO, &go_data("vol0@snap", &[]));
        let export = &replies
            .iter()
            .find(|r| r.2[..2] == INFO_EXPORT.to_be_bytes())
            .unwrap()
            .2;
        assert_ne!(
            u16::from_be_bytes([export[10], export[11]]) & FLAG_READ_ONLY,
            0
        );
        let sizes = &replies
            .iter()
            .find(|r| r.2[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .unwrap()
            .2;
        assert_eq!(be32(&sizes[2..]), 4096);
    }

    #[test]
    fn export_name_with_no_zeroes_sends_no_padding() {
        let mut c = Client::negotiated(true);
        c.send(&option_bytes(OPT_EXPORT_NAME, b"vol0"));
        let reply = c.take();
        assert_eq!(reply.len(), 10);
        assert_eq!(be64(&reply), SIZE);
    }

    #[test]
    fn export_name_without_no_zeroes_pads_124_bytes() {
        let mut c = Client::negotiated(false);
        c.send(&option_bytes(OPT_EXPORT_NAME, b""));
        assert_eq!(c.take().len(), 10 + 124);
    }

    #[test]
    fn export_name_for_unknown_export_is_a_protocol_error() {
        let mut c = Client::negotiated(true);
        let bytes = option_bytes(OPT_EXPORT_NAME, b"nope");
        let err = c.session.receive(&bytes, &c.exports, &mut c.actions);
        assert_eq!(err, Err(NbdError::UnknownExport("nope".into())));
    }

    #[test]
    fn list_names_every_export_with_its_description() {
        let mut c = Client::negotiated(true);
        let replies = c.option(OPT_LIST, &[]);
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[1].1, REP_SERVER);
        assert_eq!(
            replies[1].2,
            [
                &9u32.to_be_bytes()[..],
                b"vol0@snap",
                b"vol0@snap described"
            ]
            .concat()
        );
        assert_eq!(replies[2], (OPT_LIST, REP_ACK, vec![]));
    }

    #[test]
    fn abort_is_acknowledged_and_closes() {
        let mut c = Client::negotiated(true);
        assert_eq!(c.option(OPT_ABORT, &[]), vec![(OPT_ABORT, REP_ACK, vec![])]);
        assert!(c.actions.close);
        c.send(b"anything after abort is ignored");
        assert!(c.take().is_empty());
    }

    #[test]
    fn unsupported_option_answers_err_unsup_and_parsing_continues() {
        let mut c = Client::negotiated(true);
        assert_eq!(c.option(5, b"tls please"), vec![(5, REP_ERR_UNSUP, vec![])]);
        assert_eq!(c.option(0xdead, &[]), vec![(0xdead, REP_ERR_UNSUP, vec![])]);
        assert_eq!(
            c.option(OPT_GO, &go_data("vol0", &[])).last().unwrap().1,
            REP_ACK
        );
    }

    #[test]
    fn malformed_option_answers_err_invalid() {
        let mut c = Client::negotiated(true);
        assert_eq!(
            c.option(OPT_GO, &[0, 0, 0, 9, b'v']),
            vec![(OPT_GO, REP_ERR_INVALID, vec![])]
        );
        assert_eq!(
            c.option(OPT_STRUCTURED_REPLY, &[1]),
            vec![(8, REP_ERR_INVALID, vec![])]
        );
    }

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
    fn list_meta_context_without_queries_lists_base_allocation() {
        let mut c = Client::negotiated(true);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        let replies = c.option(OPT_LIST_META_CONTEXT, &meta_data("vol0", &[]));
        let context = [
            &BASE_ALLOCATION_ID.to_be_bytes()[..],
            BASE_ALLOCATION.as_bytes(),
        ]
        .concat();
        assert_eq!(
            replies,
            vec![(9, REP_META_CONTEXT, context.clone()), (9, REP_ACK, vec![])]
        );
        let replies = c.option(OPT_LIST_META_CONTEXT, &meta_data("vol0", &["base:"]));
        assert_eq!(replies[0].2, context);
    }

    #[test]
    fn meta_context_skips_unknown_namespaces() {
        let mut c = Client::negotiated(true);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        let queries = ["qemu:dirty-bitmap:x", "base:nothing"];
        let replies = c.option(OPT_SET_META_CONTEXT, &meta_data("vol0", &queries));
        assert_eq!(replies, vec![(OPT_SET_META_CONTEXT, REP_ACK, vec![])]);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_a_known_export() {
        let mut c = Client::negotiated(true);
        let set = meta_data("vol0", &[BASE_ALLOCATION]);
        assert_eq!(c.option(OPT_SET_META_CONTEXT, &set)[0].1, REP_ERR_INVALID);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        let unknown = meta_data("nope", &[BASE_ALLOCATION]);
        assert_eq!(
            c.option(OPT_SET_META_CONTEXT, &unknown)[0].1,
            REP_ERR_UNKNOWN
        );
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
    fn structured_read_answers_one_offset_data_chunk() {
        let mut c = Client::go("vol0", true, false);
        c.memory.data[512..1024].fill(0xab);
        c.request(CMD_READ, CMD_FLAG_DF, 3, 512, 512);
        c.run_engine();
        let chunks = chunks(&c.take());
        assert_eq!(chunks.len(), 1);
        let (flags, kind, cookie, payload) = &chunks[0];
        assert_eq!(
            (*flags, *kind, *cookie),
            (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 3)
        );
        assert_eq!(be64(payload), 512);
        assert!(payload[8..].iter().all(|&b| b == 0xab) && payload.len() == 8 + 512);
    }

    #[test]
    fn write_to_read_only_export_is_eperm_without_engine_request() {
        let mut c = Client::go("vol0@snap", false, false);
        let mut bytes = request_bytes(CMD_WRITE, 0, 4, 0, 4096);
        bytes.extend_from_slice(&[1; 4096]);
        bytes.extend_from_slice(&request_bytes(CMD_TRIM, 0, 5, 0, 4096));
        c.send(&bytes);
        let reply = c.take();
        assert_eq!(simple(&reply), (Errno::Perm.code(), 4));
        assert_eq!(simple(&reply[16..]), (Errno::Perm.code(), 5));
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn misaligned_and_out_of_range_requests_get_their_errnos() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_READ, 0, 1, 100, 512);
        c.request(CMD_READ, 0, 2, SIZE, 512);
        c.request(CMD_WRITE_ZEROES, 0, 3, SIZE - 512, 1024);
        c.request(CMD_READ, 0, 4, 0, 0);
        c.request(42, 0, 5, 0, 512);
        c.request(CMD_READ, CMD_FLAG_FUA, 6, 0, 512);
        let reply = c.take();
        let got: Vec<_> = reply.chunks(16).map(simple).collect();
        let inval = Errno::Inval.code();
        let expected = [
            (inval, 1),
            (inval, 2),
            (Errno::NoSpc.code(), 3),
            (inval, 4),
            (inval, 5),
            (inval, 6),
        ];
        assert_eq!(got, expected);
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn read_larger_than_max_payload_is_eoverflow_with_structured_replies() {
        let mut big = exports();
        big[0].size = 1 << 30;
        for (structured, errno) in [(true, Errno::Overflow), (false, Errno::Inval)] {
            let mut c = Client::go_on(big.clone(), "vol0", structured, false);
            c.request(CMD_READ, 0, 1, 0, (32 << 20) + 512);
            let reply = c.take();
            let got = if structured {
                be32(&chunks(&reply)[0].3)
            } else {
                simple(&reply).0
            };
            assert_eq!(got, errno.code());
            assert!(c.actions.submit.is_empty());
        }
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
    fn engine_errors_become_protocol_errnos_with_a_message() {
        let mut c = Client::go("vol0", true, false);
        let mut bytes = request_bytes(CMD_WRITE, CMD_FLAG_FUA, 8, 0, 512);
        bytes.extend_from_slice(&[9; 512]);
        c.send(&bytes);
        assert_eq!(c.actions.submit[0].op, Op::Write { fua: true });
        c.memory.fail_with = Some(IoError::NoSpace);
        c.run_engine();
        c.memory.fail_with = Some(IoError::Device(libc::EIO));
        c.request(CMD_READ, 0, 9, 0, 512);
        c.run_engine();
        let chunks = chunks(&c.take());
        assert_eq!((chunks[0].1, chunks[0].2), (REPLY_TYPE_ERROR, 8));
        assert_eq!(be32(&chunks[0].3), Errno::NoSpc.code());
        assert_eq!(&chunks[0].3[6..], b"pool is full");
        assert_eq!((chunks[1].2, be32(&chunks[1].3)), (9, Errno::Io.code()));
    }

    #[test]
    fn flush_trim_and_write_zeroes_reach_the_engine_with_their_flags() {
        let mut c = Client::go("vol0", true, false);
        c.request(CMD_FLUSH, 0, 1, 0, 0);
        c.request(CMD_TRIM, CMD_FLAG_FUA, 2, 0, 4096);
        let zero_flags = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO;
        c.request(CMD_WRITE_ZEROES, zero_flags, 3, 4096, 4096);
        let ops: Vec<_> = c
            .actions
            .submit
            .iter()
            .map(|r| (r.op, r.offset, r.len))
            .collect();
        assert_eq!(
            ops,
            [
                (Op::Flush, 0, 0),
                (Op::Trim, 0, 4096),
                (Op::WriteZeroes { fua: true }, 4096, 4096)
            ]
        );
        assert!(c
            .actions
            .submit
            .iter()
            .all(|r| r.buf.is_none() && r.volume == VolumeId(1)));
        c.run_engine();
        let done: Vec<_> = chunks(&c.take())
            .iter()
            .map(|ch| (ch.0, ch.1, ch.2))
            .collect();
        let none = |cookie| (REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie);
        assert_eq!(done, [none(1), none(2), none(3)]);
    }

    #[test]
    fn cache_succeeds_without_engine_request() {
        let mut c = Client::go("vol0", false, false);
        c.request(CMD_CACHE, 0, 6, 0, 4096);
        assert_eq!(simple(&c.take()), (0, 6));
        assert!(c.actions.submit.is_empty());
    }

    #[test]
    fn block_status_maps_unallocated_to_hole_and_zero() {
        let mut c = Client::go("vol0", true, true);
        c.memory.allocated[1] = true;
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 16384);
        c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 8, 4096, 12288);
        c.run_engine();
        let chunks = chunks(&c.take());
        let descriptors = |payload: &[u8]| -> Vec<(u32, u32)> {
            assert_eq!(be32(payload), BASE_ALLOCATION_ID);
            payload[4..]
                .chunks(8)
                .map(|d| (be32(d), be32(&d[4..])))
                .collect()
        };
        let hole = STATE_HOLE | STATE_ZERO;
        assert_eq!((chunks[0].1, chunks[0].2), (REPLY_TYPE_BLOCK_STATUS, 7));
        assert_eq!(
            descriptors(&chunks[0].3),
            [(4096, hole), (4096, 0), (8192, hole)]
        );
        assert_eq!(descriptors(&chunks[1].3), [(4096, 0)]);
    }

    #[test]
    fn block_status_without_base_allocation_is_einval() {
        let mut c = Client::go("vol0", true, false);
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
        assert_eq!(be32(&chunks(&c.take())[0].3), Errno::Inval.code());
        let mut c = Client::negotiated(true);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        c.option(
            OPT_SET_META_CONTEXT,
            &meta_data("vol0@snap", &[BASE_ALLOCATION]),
        );
        c.option(OPT_GO, &go_data("vol0", &[]));
        c.request(CMD_BLOCK_STATUS, 0, 7, 0, 4096);
        assert_eq!(be32(&chunks(&c.take())[0].3), Errno::Inval.code());
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
