//! The handshake phase: greeting, option codec, and the answer to each option.
//!
//! Pure: options come in as bytes, answers go out as bytes; the session decides when a
//! whole option has arrived.

use super::proto::*;
use super::transmission::{transmission_flags, Transmission};
use super::{NbdConfig, NbdError};
use crate::export::{ExportInfo, Exports};

/// Bytes of the client's flags word.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest string the protocol allows (export names, queries).
const MAX_STRING: usize = 4096;

/// Write the server greeting: magics and handshake flags.
pub fn put_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// Decode the client's flags word; unknown flags end the session, as the protocol requires.
pub fn parse_client_flags(bytes: [u8; CLIENT_FLAGS_LEN]) -> Result<Negotiation, NbdError> {
    let flags = u32::from_be_bytes(bytes);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags(flags));
    }
    Ok(Negotiation {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        tls: false,
        structured: false,
        meta_export: None,
        block_size_requested: false,
    })
}

/// The fixed part of a client option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (NBD_OPT_*).
    pub option: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

/// Decode an option header; a wrong magic ends the session.
pub fn parse_option_header(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, NbdError> {
    let magic = u64::from_be_bytes(bytes[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(NbdError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes")),
        len: u32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes")),
    })
}

/// Append one option reply.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&REP_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// A decoded client option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// NBD_OPT_EXPORT_NAME with the name.
    ExportName(String),
    /// NBD_OPT_ABORT.
    Abort,
    /// NBD_OPT_LIST.
    List,
    /// NBD_OPT_STARTTLS.
    StartTls,
    /// NBD_OPT_INFO (`go: false`) or NBD_OPT_GO (`go: true`).
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    /// NBD_OPT_STRUCTURED_REPLY.
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT (`set: false`) or NBD_OPT_SET_META_CONTEXT (`set: true`).
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    /// Any option tessel does not implement.
    Unsupported,
}

/// Why option data could not be decoded (answered with NBD_REP_ERR_INVALID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedOption;

/// Decode an option's data.
pub fn decode_option(option: u32, data: &[u8]) -> Result<ClientOption, MalformedOption> {
    let mut r = Reader(data);
    let decoded = match option {
        OPT_EXPORT_NAME => ClientOption::ExportName(r.string(data.len())?),
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST => ClientOption::List,
        OPT_STARTTLS => ClientOption::StartTls,
        OPT_STRUCTURED_REPLY => ClientOption::StructuredReply,
        OPT_INFO | OPT_GO => {
            let name_len = r.u32()? as usize;
            let name = r.string(name_len)?;
            let count = r.u16()?;
            let requests = (0..count).map(|_| r.u16()).collect::<Result<_, _>>()?;
            ClientOption::Info {
                go: option == OPT_GO,
                name,
                requests,
            }
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let name_len = r.u32()? as usize;
            let export = r.string(name_len)?;
            let count = r.u32()?;
            let mut queries = Vec::new();
            for _ in 0..count {
                let len = r.u32()? as usize;
                queries.push(r.string(len)?);
            }
            ClientOption::MetaContext {
                set: option == OPT_SET_META_CONTEXT,
                export,
                queries,
            }
        }
        _ => return Ok(ClientOption::Unsupported),
    };
    // ABORT may carry data the client should not have sent; be lenient there only.
    if !r.0.is_empty() && decoded != ClientOption::Abort {
        return Err(MalformedOption);
    }
    Ok(decoded)
}

/// Big-endian reader over option data; every read fails cleanly at the end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], MalformedOption> {
        if n > self.0.len() {
            return Err(MalformedOption);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, MalformedOption> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, MalformedOption> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn string(&mut self, n: usize) -> Result<String, MalformedOption> {
        if n > MAX_STRING {
            return Err(MalformedOption);
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| MalformedOption)
    }
}

/// What the session does after an option was answered.
#[derive(Debug)]
pub enum OptionOutcome {
    /// Stay in the option phase.
    Continue,
    /// The client aborted: close once the reply is sent.
    Abort,
    /// NBD_OPT_STARTTLS acknowledged: TLS starts after the reply, and the option phase
    /// goes on inside it.
    StartTls,
    /// Enter transmission on this export.
    Transmit(Transmission),
}

/// What a session needs from outside to answer an option.
pub struct OptionContext<'a> {
    /// The exports visible now.
    pub exports: &'a dyn Exports,
    /// Session limits.
    pub config: &'a NbdConfig,
    /// True once the daemon shuts down: options are refused.
    pub shutting_down: bool,
}

/// What the client and server agreed so far in the option phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiation {
    /// The client set NBD_FLAG_C_NO_ZEROES.
    pub no_zeroes: bool,
    /// NBD_OPT_STARTTLS was acknowledged: the connection runs TLS.
    pub tls: bool,
    /// NBD_OPT_STRUCTURED_REPLY was acknowledged.
    pub structured: bool,
    /// The export `base:allocation` was selected for by NBD_OPT_SET_META_CONTEXT.
    pub meta_export: Option<String>,
    /// An NBD_OPT_INFO or NBD_OPT_GO asked for NBD_INFO_BLOCK_SIZE: the client agreed to
    /// the constraints it was sent, and requests outside them are refused. Without, the
    /// protocol's defaults hold (any byte range; see docs/nbd.md).
    pub block_size_requested: bool,
}

impl Negotiation {
    /// Answer one option into `out`. Err only where the protocol leaves no way to reply
    /// (NBD_OPT_EXPORT_NAME that cannot be satisfied).
    pub fn answer(
        &mut self,
        option: u32,
        data: &[u8],
        ctx: &OptionContext,
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, NbdError> {
        let reply = |out: &mut Vec<u8>, code| put_option_reply(out, option, code, &[]);
        let forced = ctx.config.tls.as_ref().is_some_and(|p| p.forced());
        if forced && !self.tls && option != OPT_STARTTLS && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                let name = String::from_utf8_lossy(data).into_owned();
                return Err(NbdError::TlsRequired(name));
            }
            reply(out, REP_ERR_TLS_REQD);
            return Ok(OptionOutcome::Continue);
        }
        let decoded = decode_option(option, data);
        if let Ok(ClientOption::ExportName(name)) = &decoded {
            return self.export_name(name, ctx, out);
        }
        if option == OPT_EXPORT_NAME {
            return Err(NbdError::UnknownExport(
                String::from_utf8_lossy(data).into_owned(),
            ));
        }
        if ctx.shutting_down && option != OPT_ABORT {
            reply(out, REP_ERR_SHUTDOWN);
            return Ok(OptionOutcome::Continue);
        }
        match decoded {
            Err(MalformedOption) => reply(out, REP_ERR_INVALID),
            Ok(ClientOption::Abort) => {
                reply(out, REP_ACK);
                return Ok(OptionOutcome::Abort);
            }
            Ok(ClientOption::StartTls) => match (&ctx.config.tls, self.tls) {
                (None, _) => reply(out, REP_ERR_POLICY),
                (Some(_), true) => reply(out, REP_ERR_INVALID),
                (Some(_), false) => {
                    reply(out, REP_ACK);
                    // What was agreed in plain text may have been injected by a meddler
                    // (CVE-2021-3716): start over inside TLS, keeping only the flags word.
                    *self = Negotiation {
                        no_zeroes: self.no_zeroes,
                        tls: true,
                        structured: false,
                        meta_export: None,
                        block_size_requested: false,
                    };
                    return Ok(OptionOutcome::StartTls);
                }
            },
            Ok(ClientOption::List) => {
                // SELECTIVETLS: exports that need TLS are not listed in plain text.
                let visible = ctx.exports.list().into_iter();
                for export in visible.filter(|e| !self.locked(&e.name, ctx)) {
                    let mut item = Vec::new();
                    item.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    item.extend_from_slice(export.name.as_bytes());
                    item.extend_from_slice(export.description.as_bytes());
                    put_option_reply(out, option, REP_SERVER, &item);
                }
                reply(out, REP_ACK);
            }
            Ok(ClientOption::StructuredReply) => {
                self.structured = true;
                reply(out, REP_ACK);
            }
            Ok(ClientOption::Info { go, name, requests }) => {
                let Some(export) = resolve(ctx.exports, &name) else {
                    reply(out, REP_ERR_UNKNOWN);
                    return Ok(OptionOutcome::Continue);
                };
                if self.locked(&export.name, ctx) {
                    reply(out, REP_ERR_TLS_REQD);
                    return Ok(OptionOutcome::Continue);
                }
                self.block_size_requested |= requests.contains(&INFO_BLOCK_SIZE);
                if go && !self.block_size_requested && ctx.config.require_block_size {
                    // The sizes first, as the protocol suggests, to save the client a round.
                    self.put_block_size(option, &export, ctx.config, out);
                    reply(out, REP_ERR_BLOCK_SIZE_REQD);
                    return Ok(OptionOutcome::Continue);
                }
                self.put_info(option, &export, &requests, ctx.config, out);
                reply(out, REP_ACK);
                if go {
                    return Ok(OptionOutcome::Transmit(self.transmission(export)));
                }
            }
            Ok(ClientOption::MetaContext {
                set,
                export,
                queries,
            }) => self.meta_context(option, set, &export, &queries, ctx, out),
            Ok(ClientOption::ExportName(_)) | Ok(ClientOption::Unsupported) => {
                reply(out, REP_ERR_UNSUP)
            }
        }
        Ok(OptionOutcome::Continue)
    }

    fn export_name(
        &self,
        name: &str,
        ctx: &OptionContext,
        out: &mut Vec<u8>,
    ) -> Result<OptionOutcome, NbdError> {
        if ctx.shutting_down {
            return Err(NbdError::ShuttingDown);
        }
        if ctx.config.require_block_size {
            return Err(NbdError::BlockSizeRequired);
        }
        let export =
            resolve(ctx.exports, name).ok_or_else(|| NbdError::UnknownExport(name.into()))?;
        if self.locked(&export.name, ctx) {
            return Err(NbdError::TlsRequired(name.into()));
        }
        let transmission = self.transmission(export);
        out.extend_from_slice(&transmission.export.size.to_be_bytes());
        out.extend_from_slice(&transmission.flags().to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Ok(OptionOutcome::Transmit(transmission))
    }

    /// NBD_REP_INFO items: EXPORT and BLOCK_SIZE always, NAME and DESCRIPTION on request.
    fn put_info(
        &self,
        option: u32,
        export: &ExportInfo,
        requests: &[u16],
        config: &NbdConfig,
        out: &mut Vec<u8>,
    ) {
        let mut item = |kind: u16, body: &[u8]| {
            let mut data = kind.to_be_bytes().to_vec();
            data.extend_from_slice(body);
            put_option_reply(out, option, REP_INFO, &data);
        };
        let mut body = export.size.to_be_bytes().to_vec();
        body.extend_from_slice(&transmission_flags(export, self.structured).to_be_bytes());
        item(INFO_EXPORT, &body);
        if requests.contains(&INFO_NAME) {
            item(INFO_NAME, export.name.as_bytes());
        }
        if requests.contains(&INFO_DESCRIPTION) {
            item(INFO_DESCRIPTION, export.description.as_bytes());
        }
        self.put_block_size(option, export, config, out);
    }

    /// NBD_REP_INFO with NBD_INFO_BLOCK_SIZE: the constraints this connection is held to.
    /// A client that asked for them gets the export's block size and the payload limit; one
    /// that did not is served the protocol's defaults (minimum 1, any length up to what
    /// memory holds), and is told so.
    fn put_block_size(
        &self,
        option: u32,
        export: &ExportInfo,
        config: &NbdConfig,
        out: &mut Vec<u8>,
    ) {
        let strict = self.block_size_requested || config.require_block_size;
        let preferred = export.block_size.max(config.preferred_block_size);
        let (min, max) = if strict {
            (export.block_size, config.max_payload.max(preferred))
        } else {
            (1, config.max_unnegotiated.max(preferred))
        };
        let mut data = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for size in [min, preferred, max] {
            data.extend_from_slice(&size.to_be_bytes());
        }
        put_option_reply(out, option, REP_INFO, &data);
    }

    /// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT: only `base:allocation` exists.
    fn meta_context(
        &mut self,
        option: u32,
        set: bool,
        export: &str,
        queries: &[String],
        ctx: &OptionContext,
        out: &mut Vec<u8>,
    ) {
        if !self.structured {
            return put_option_reply(out, option, REP_ERR_INVALID, &[]);
        }
        let Some(export) = resolve(ctx.exports, export) else {
            return put_option_reply(out, option, REP_ERR_UNKNOWN, &[]);
        };
        if self.locked(&export.name, ctx) {
            return put_option_reply(out, option, REP_ERR_TLS_REQD, &[]);
        }
        let matches = |q: &String| q == BASE_ALLOCATION || (!set && q == "base:");
        let selected = if set {
            queries.iter().any(matches)
        } else {
            queries.is_empty() || queries.iter().any(matches)
        };
        if selected {
            let mut data = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            data.extend_from_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(out, option, REP_META_CONTEXT, &data);
        }
        if set {
            self.meta_export = selected.then_some(export.name);
        }
        put_option_reply(out, option, REP_ACK, &[]);
    }

    /// True when `export` needs TLS and this connection does not run it.
    fn locked(&self, export: &str, ctx: &OptionContext) -> bool {
        !self.tls && ctx.config.tls.as_ref().is_some_and(|p| p.requires(export))
    }

    fn transmission(&self, export: ExportInfo) -> Transmission {
        Transmission {
            base_allocation: self.meta_export.as_deref() == Some(export.name.as_str()),
            structured: self.structured,
            strict: self.block_size_requested,
            export,
        }
    }
}

/// The export a client names; the empty name is the first export.
fn resolve(exports: &dyn Exports, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        exports.list().into_iter().next()
    } else {
        exports.lookup(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::testing::*;

    fn info_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    #[test]
    fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let mut out = Vec::new();
        put_greeting(&mut out);
        assert_eq!(&out[..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(out[16..], [0, 3]);
    }

    #[test]
    fn unknown_client_flags_end_the_session() {
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]),
            Err(NbdError::UnknownClientFlags(4))
        );
        assert!(parse_client_flags([0, 0, 0, 3]).unwrap().no_zeroes);
    }

    #[test]
    fn info_option_decodes_name_and_requests() {
        let d = info_data("vol0", &[INFO_NAME, INFO_BLOCK_SIZE]);
        assert_eq!(
            decode_option(OPT_GO, &d),
            Ok(ClientOption::Info {
                go: true,
                name: "vol0".into(),
                requests: vec![INFO_NAME, INFO_BLOCK_SIZE]
            })
        );
    }

    #[test]
    fn info_option_with_trailing_or_missing_bytes_is_malformed() {
        let mut d = info_data("vol0", &[INFO_NAME]);
        d.push(0);
        assert_eq!(decode_option(OPT_INFO, &d), Err(MalformedOption));
        assert_eq!(decode_option(OPT_INFO, &d[..5]), Err(MalformedOption));
        assert_eq!(decode_option(OPT_LIST, &[1]), Err(MalformedOption));
    }

    #[test]
    fn unknown_options_decode_as_unsupported() {
        assert_eq!(decode_option(4, &[1, 2, 3]), Ok(ClientOption::Unsupported));
    }

    #[test]
    fn go_reports_size_flags_name_and_block_sizes_then_enters_transmission() {
        let mut c = Client::negotiated(true);
        let asked = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
        let replies = c.option(OPT_GO, &go_data("vol0", &asked));
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

    fn block_sizes(replies: &[(u32, u32, Vec<u8>)]) -> [u32; 3] {
        let r = replies
            .iter()
            .find(|r| r.1 == REP_INFO && r.2[..2] == INFO_BLOCK_SIZE.to_be_bytes())
            .expect("an NBD_INFO_BLOCK_SIZE reply");
        [be32(&r.2[2..]), be32(&r.2[6..]), be32(&r.2[10..])]
    }

    #[test]
    fn go_without_asking_for_block_sizes_is_told_the_protocol_defaults() {
        let config = NbdConfig {
            max_unnegotiated: 1 << 30,
            ..NbdConfig::default()
        };
        let mut c = Client::connect_with(config, exports());
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let replies = c.option(OPT_GO, &go_data("vol0", &[]));
        assert_eq!(block_sizes(&replies), [1, 4096, 1 << 30]);
        assert_eq!(replies.last().unwrap().1, REP_ACK);
    }

    #[test]
    fn block_sizes_asked_for_by_info_hold_for_a_later_go() {
        let mut c = Client::negotiated(true);
        let info = c.option(OPT_INFO, &go_data("vol0", &[INFO_BLOCK_SIZE]));
        assert_eq!(block_sizes(&info), [512, 4096, 32 << 20]);
        let go = c.option(OPT_GO, &go_data("vol0", &[]));
        assert_eq!(block_sizes(&go), [512, 4096, 32 << 20]);
        c.request(CMD_READ, 0, 1, 100, 512);
        assert_eq!(simple(&c.take()), (Errno::Inval.code(), 1));
    }

    #[test]
    fn require_block_size_refuses_go_without_info_block_size_and_export_name() {
        let config = NbdConfig {
            require_block_size: true,
            ..NbdConfig::default()
        };
        let mut c = Client::connect_with(config.clone(), exports());
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        // NBD_OPT_INFO may ask for nothing: it is told the sizes it will be held to.
        let info = c.option(OPT_INFO, &go_data("vol0", &[]));
        assert_eq!(block_sizes(&info), [512, 4096, 32 << 20]);
        assert_eq!(info.last().unwrap().1, REP_ACK);
        let refused = c.option(OPT_GO, &go_data("vol0", &[INFO_NAME]));
        assert_eq!(block_sizes(&refused), [512, 4096, 32 << 20]);
        assert_eq!(refused.last().unwrap().1, REP_ERR_BLOCK_SIZE_REQD);
        let go = c.option(OPT_GO, &go_data("vol0", &[INFO_BLOCK_SIZE]));
        assert_eq!(go.last().unwrap().1, REP_ACK);

        let mut c = Client::connect_with(config, exports());
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let bytes = option_bytes(OPT_EXPORT_NAME, b"vol0");
        let err = c.session.receive(&bytes, &c.exports, &mut c.actions);
        assert_eq!(err, Err(NbdError::BlockSizeRequired));
        assert!(c.take().is_empty(), "no export information was sent");
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
        let replies = c.option(OPT_GO, &go_data("vol0@snap", &[INFO_BLOCK_SIZE]));
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
        assert_eq!(c.option(4, b"peek"), vec![(4, REP_ERR_UNSUP, vec![])]);
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

    proptest::proptest! {
        #[test]
        fn any_option_but_export_name_gets_a_final_reply(
            option in 0u32..16,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            structured in proptest::prelude::any::<bool>(),
        ) {
            proptest::prop_assume!(option != OPT_EXPORT_NAME);
            let exports = exports();
            let config = NbdConfig::default();
            let ctx = OptionContext { exports: &exports, config: &config, shutting_down: false };
            let mut negotiation = parse_client_flags([0, 0, 0, 3]).unwrap();
            negotiation.structured = structured;
            let mut out = Vec::new();
            let outcome = negotiation.answer(option, &data, &ctx, &mut out).unwrap();
            let replies = parse_option_replies(&out);
            let last = replies.last().unwrap();
            proptest::prop_assert_eq!(last.0, option);
            let final_reply = last.1 == REP_ACK || last.1 & (1 << 31) != 0;
            proptest::prop_assert!(final_reply);
            let transmits = matches!(outcome, OptionOutcome::Transmit(_));
            proptest::prop_assert_eq!(transmits, option == OPT_GO && last.1 == REP_ACK);
        }
    }
}
