//! Which exports need TLS, and what that means for a connection before NBD_OPT_STARTTLS
//! (the TLS section of the NBD protocol: FORCEDTLS when every export needs it, otherwise
//! SELECTIVETLS). The TLS itself runs in the driver, between the socket and the session: the
//! session only says when to start it (`Actions::start_tls`).

use std::collections::BTreeMap;

/// Whether one export may be used without TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// Served with or without TLS.
    Optional,
    /// Served only once the connection runs TLS.
    Require,
}

/// The TLS needs of every export on a daemon that offers TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Exports not named in `exports` (volumes and snapshots created later too).
    pub default: TlsMode,
    /// Exports with their own mode, by export name (`vol` or `vol@snap`).
    pub exports: BTreeMap<String, TlsMode>,
}

impl TlsPolicy {
    /// True when `export` is served only over TLS.
    pub fn requires(&self, export: &str) -> bool {
        self.exports.get(export).copied().unwrap_or(self.default) == TlsMode::Require
    }

    /// True when every export needs TLS: the server runs FORCEDTLS, answering every option
    /// but STARTTLS and ABORT with NBD_REP_ERR_TLS_REQD until TLS is up, so not even the
    /// export list is seen in plain text.
    pub fn forced(&self) -> bool {
        self.default == TlsMode::Require && self.exports.values().all(|&m| m == TlsMode::Require)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use crate::nbd::testing::*;
    use crate::nbd::{NbdConfig, NbdError};
    use std::sync::Arc;

    /// `vol0` needs TLS unless `vol0_optional`; `vol0@snap` follows `default`.
    fn policy(default: TlsMode, vol0: TlsMode) -> NbdConfig {
        let exports = BTreeMap::from([("vol0".to_string(), vol0)]);
        NbdConfig {
            tls: Some(Arc::new(TlsPolicy { default, exports })),
            ..NbdConfig::default()
        }
    }

    fn forced() -> Client {
        Client::negotiated_with(policy(TlsMode::Require, TlsMode::Require))
    }

    /// `vol0` needs TLS, `vol0@snap` does not.
    fn selective() -> Client {
        Client::negotiated_with(policy(TlsMode::Optional, TlsMode::Require))
    }

    fn start_tls(c: &mut Client) {
        assert_eq!(
            c.option(OPT_STARTTLS, &[]),
            vec![(OPT_STARTTLS, REP_ACK, vec![])]
        );
        assert!(c.actions.start_tls, "the driver is told to start TLS");
        c.actions.start_tls = false;
    }

    #[test]
    fn policy_modes_per_export_and_default() {
        let p = |default, vol0| policy(default, vol0).tls.unwrap();
        assert!(p(TlsMode::Require, TlsMode::Require).forced());
        assert!(!p(TlsMode::Require, TlsMode::Optional).forced());
        assert!(!p(TlsMode::Optional, TlsMode::Require).forced());
        let selective = p(TlsMode::Optional, TlsMode::Require);
        assert!(selective.requires("vol0"));
        assert!(!selective.requires("vol0@snap"));
        assert!(!selective.requires("made-later"));
    }

    #[test]
    fn forced_tls_refuses_every_option_but_starttls_and_abort_in_plain_text() {
        let mut c = forced();
        for (option, data) in [
            (OPT_LIST, vec![]),
            (OPT_STRUCTURED_REPLY, vec![]),
            (OPT_GO, go_data("vol0@snap", &[])),
            (OPT_INFO, go_data("", &[])),
            (OPT_SET_META_CONTEXT, meta_data("vol0", &[BASE_ALLOCATION])),
            (0xdead, b"unknown".to_vec()),
            (OPT_GO, vec![1]),
        ] {
            assert_eq!(
                c.option(option, &data),
                vec![(option, REP_ERR_TLS_REQD, vec![])],
                "option {option}"
            );
        }
        assert!(c.actions.submit.is_empty() && !c.actions.start_tls);
        let bytes = option_bytes(OPT_EXPORT_NAME, b"vol0@snap");
        let err = c.session.receive(&bytes, &c.exports, &mut c.actions);
        assert_eq!(err, Err(NbdError::TlsRequired("vol0@snap".into())));
        assert!(c.take().is_empty(), "no export size is sent");
    }

    #[test]
    fn forced_tls_answers_abort() {
        let mut c = forced();
        assert_eq!(c.option(OPT_ABORT, &[]), vec![(OPT_ABORT, REP_ACK, vec![])]);
        assert!(c.actions.close);
    }

    #[test]
    fn after_starttls_every_option_is_answered_and_go_serves_the_export() {
        let mut c = forced();
        start_tls(&mut c);
        assert_eq!(c.option(OPT_LIST, &[]).len(), 3);
        let replies = c.option(OPT_GO, &go_data("vol0", &[]));
        assert_eq!(replies.last().unwrap().1, REP_ACK, "{replies:?}");
        c.request(CMD_FLUSH, 0, 7, 0, 0);
        assert_eq!(c.actions.submit.len(), 1);
    }

    #[test]
    fn starttls_twice_is_invalid_and_tls_stays_on() {
        let mut c = forced();
        start_tls(&mut c);
        assert_eq!(
            c.option(OPT_STARTTLS, &[]),
            vec![(OPT_STARTTLS, REP_ERR_INVALID, vec![])]
        );
        assert!(!c.actions.start_tls);
        assert_eq!(
            c.option(OPT_GO, &go_data("vol0", &[])).last().unwrap().1,
            REP_ACK
        );
    }

    #[test]
    fn starttls_with_data_is_invalid_and_starts_nothing() {
        let mut c = forced();
        assert_eq!(
            c.option(OPT_STARTTLS, b"x"),
            vec![(OPT_STARTTLS, REP_ERR_INVALID, vec![])]
        );
        assert!(!c.actions.start_tls);
    }

    #[test]
    fn starttls_without_tls_configured_is_refused_by_policy() {
        let mut c = Client::negotiated(true);
        assert_eq!(
            c.option(OPT_STARTTLS, &[]),
            vec![(OPT_STARTTLS, REP_ERR_POLICY, vec![])]
        );
        assert!(!c.actions.start_tls);
        assert_eq!(
            c.option(OPT_GO, &go_data("vol0", &[])).last().unwrap().1,
            REP_ACK
        );
    }

    #[test]
    fn bytes_after_starttls_are_left_for_the_tls_layer() {
        let mut c = forced();
        let mut bytes = option_bytes(OPT_STARTTLS, &[]);
        let starttls_len = bytes.len();
        // A client (or a meddler) that pipelines plain text after STARTTLS: those bytes
        // must reach TLS (and fail there), never be answered as options.
        bytes.extend_from_slice(&option_bytes(OPT_GO, &go_data("vol0", &[])));
        let used = c.session.receive(&bytes, &c.exports, &mut c.actions);
        assert_eq!(used, Ok(starttls_len));
        assert!(c.actions.start_tls);
        assert_eq!(
            parse_option_replies(&c.take()),
            vec![(OPT_STARTTLS, REP_ACK, vec![])]
        );
    }

    #[test]
    fn starttls_forgets_what_was_negotiated_in_plain_text() {
        // CVE-2021-3716: structured replies negotiated before TLS (by a meddler, say) must
        // not apply inside it.
        let mut c = selective();
        assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].1, REP_ACK);
        let meta = meta_data("vol0@snap", &[BASE_ALLOCATION]);
        assert_eq!(c.option(OPT_SET_META_CONTEXT, &meta)[0].1, REP_META_CONTEXT);
        start_tls(&mut c);
        let meta = meta_data("vol0@snap", &[BASE_ALLOCATION]);
        assert_eq!(
            c.option(OPT_SET_META_CONTEXT, &meta)[0].1,
            REP_ERR_INVALID,
            "structured replies were forgotten"
        );
        assert_eq!(
            c.option(OPT_GO, &go_data("vol0@snap", &[]))
                .last()
                .unwrap()
                .1,
            REP_ACK
        );
        c.request(CMD_READ, 0, 9, 0, 4096);
        c.run_engine();
        let reply = c.take();
        assert_eq!(
            simple(&reply),
            (0, 9),
            "a simple reply, not a structured one"
        );
    }

    #[test]
    fn selective_tls_refuses_tls_only_exports_in_plain_text_and_serves_the_others() {
        let mut c = selective();
        for option in [OPT_GO, OPT_INFO] {
            assert_eq!(
                c.option(option, &go_data("vol0", &[])),
                vec![(option, REP_ERR_TLS_REQD, vec![])]
            );
            // The empty name is the first export, vol0: no way around the rule.
            assert_eq!(
                c.option(option, &go_data("", &[])),
                vec![(option, REP_ERR_TLS_REQD, vec![])]
            );
        }
        assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].1, REP_ACK);
        for option in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let meta = meta_data("vol0", &[BASE_ALLOCATION]);
            assert_eq!(c.option(option, &meta)[0].1, REP_ERR_TLS_REQD);
        }
        let listed = c.option(OPT_LIST, &[]);
        let names: Vec<&[u8]> = listed
            .iter()
            .filter(|r| r.1 == REP_SERVER)
            .map(|r| &r.2[4..4 + be32(&r.2) as usize])
            .collect();
        assert_eq!(
            names,
            vec![&b"vol0@snap"[..]],
            "the TLS-only export is hidden"
        );
        assert_eq!(
            c.option(OPT_GO, &go_data("vol0@snap", &[]))
                .last()
                .unwrap()
                .1,
            REP_ACK,
            "an optional export is served in plain text"
        );
    }

    #[test]
    fn selective_tls_closes_on_export_name_for_a_tls_only_export() {
        let mut c = selective();
        let bytes = option_bytes(OPT_EXPORT_NAME, b"vol0");
        let err = c.session.receive(&bytes, &c.exports, &mut c.actions);
        assert_eq!(err, Err(NbdError::TlsRequired("vol0".into())));
        assert!(c.take().is_empty(), "no export size is sent");
    }

    #[test]
    fn selective_tls_serves_tls_only_exports_after_starttls() {
        let mut c = selective();
        start_tls(&mut c);
        assert_eq!(c.option(OPT_LIST, &[]).len(), 3, "both exports listed");
        c.send(&option_bytes(OPT_EXPORT_NAME, b"vol0"));
        assert_eq!(be64(&c.take()), SIZE);
    }
}
