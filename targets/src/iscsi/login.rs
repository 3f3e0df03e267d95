//! The login phase (RFC 7143 sections 6.3 and 11.12): stage transitions, the declarative
//! keys that pick the session and target, security negotiation (None or CHAP) and
//! operational negotiation. Produces the keys and flags of each Login Response; the
//! session wraps them in PDUs.

use super::access::{TargetAccess, OPEN};
use super::chap::{self, ChapError, ChapExchange};
use super::negotiate::{Limits, Negotiator};
use super::text::{TextPairs, MAX_TEXT_LEN};
use super::IscsiConfig;
use crate::export::{ExportInfo, Exports};

/// Login stages (CSG/NSG values).
pub const SECURITY: u8 = 0;
pub const OPERATIONAL: u8 = 1;
pub const FULL_FEATURE: u8 = 3;

/// Login status class and detail (RFC 7143 11.13.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginStatus(pub u8, pub u8);

impl LoginStatus {
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus(2, 0x00);
    pub const AUTHENTICATION_FAILED: LoginStatus = LoginStatus(2, 0x01);
    pub const AUTHORIZATION_FAILED: LoginStatus = LoginStatus(2, 0x02);
    pub const NOT_FOUND: LoginStatus = LoginStatus(2, 0x03);
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus(2, 0x05);
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus(2, 0x07);
    pub const UNSUPPORTED_SESSION_TYPE: LoginStatus = LoginStatus(2, 0x09);
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus(2, 0x0a);
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus(2, 0x0b);
}

/// Which kind of session the login creates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// I/O to one target: the volume's name and its IQN.
    Normal { volume: String, target_name: String },
}

/// The answer to one Login Request (status success).
#[derive(Debug, Default)]
pub struct LoginReply {
    pub keys: TextPairs,
    pub transit: bool,
    pub csg: u8,
    pub nsg: u8,
}

#[derive(Debug)]
enum Auth {
    /// No AuthMethod chosen yet.
    Pending,
    /// CHAP chosen; the exchange holds the challenge once CHAP_A was answered.
    Chap(ChapExchange),
    /// Authenticated, or no authentication needed.
    Done,
}

/// One connection's login in progress.
#[derive(Debug)]
pub struct Login {
    stage: u8,
    first: bool,
    initiator: Option<String>,
    kind: Option<SessionKind>,
    access: TargetAccess,
    auth: Auth,
    negotiator: Option<Negotiator>,
    /// Text of Login Requests with the C bit, until the last piece arrives.
    partial: Vec<u8>,
}

impl Default for Login {
    fn default() -> Self {
        Login::new()
    }
}

impl Login {
    /// A login waiting for its first request.
    pub fn new() -> Login {
        Login {
            stage: SECURITY,
            first: true,
            initiator: None,
            kind: None,
            access: TargetAccess::default(),
            auth: Auth::Pending,
            negotiator: None,
            partial: Vec::new(),
        }
    }

    /// The session kind, once known.
    pub fn kind(&self) -> Option<&SessionKind> {
        self.kind.as_ref()
    }

    /// The initiator's name, once known.
    pub fn initiator(&self) -> Option<&str> {
        self.initiator.as_deref()
    }

    /// The negotiated parameters (defaults until negotiation started).
    pub fn negotiator(&self) -> Option<&Negotiator> {
        self.negotiator.as_ref()
    }

    /// Handles one Login Request; Err ends the login with that status.
    pub fn step(
        &mut self,
        req: &super::pdu::LoginRequest,
        data: &[u8],
        config: &IscsiConfig,
        exports: &dyn Exports,
    ) -> Result<LoginReply, LoginStatus> {
        if req.version_min > 0 {
            return Err(LoginStatus::UNSUPPORTED_VERSION);
        }
        if req.tsih != 0 {
            // Adding connections to an existing session needs MC/S, which is not offered.
            return Err(LoginStatus::SESSION_DOES_NOT_EXIST);
        }
        if req.csg == 2 || req.csg == FULL_FEATURE || req.csg < self.stage {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        self.partial.extend_from_slice(data);
        if self.partial.len() > MAX_TEXT_LEN {
            return Err(LoginStatus::INITIATOR_ERROR);
        }
        if req.cont {
            return Ok(LoginReply {
                keys: TextPairs::default(),
                transit: false,
                csg: req.csg,
                nsg: req.nsg,
            });
        }
        let text = std::mem::take(&mut self.partial);
        let keys = TextPairs::parse(&text).map_err(|_| LoginStatus::INITIATOR_ERROR)?;
        let mut out = TextPairs::default();
        if self.first {
            self.first = false;
            self.begin(&keys, config, exports, &mut out)?;
        }
        if req.csg == OPERATIONAL && self.stage == SECURITY {
            // Skipping security negotiation is fine only when no authentication is required.
            if self.access.chap.is_some() {
                return Err(LoginStatus::AUTHENTICATION_FAILED);
            }
            self.auth = Auth::Done;
            self.stage = OPERATIONAL;
        }
        let negotiator = self
            .negotiator
            .as_mut()
            .expect("negotiator exists after the first request");
        for (key, value) in &keys.0 {
            match key.as_str() {
                "InitiatorName" | "TargetName" | "SessionType" => {}
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C"
                    if req.csg == SECURITY => {}
                "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                    out.push(key.clone(), "Irrelevant")
                }
                _ => negotiator.answer_into(key, value, &mut out),
            }
        }
        if req.csg == SECURITY {
            self.authenticate(&keys, &mut out)?;
        }
        let transit = req.transit && matches!(self.auth, Auth::Done);
        if transit {
            if req.nsg == FULL_FEATURE {
                self.negotiator
                    .as_mut()
                    .expect("negotiator")
                    .finish(&mut out);
            }
            self.stage = req.nsg;
        }
        Ok(LoginReply {
            keys: out,
            transit,
            csg: req.csg,
            nsg: req.nsg,
        })
    }

    /// The first request names the initiator, the session type and the target.
    fn begin(
        &mut self,
        keys: &TextPairs,
        config: &IscsiConfig,
        exports: &dyn Exports,
        out: &mut TextPairs,
    ) -> Result<(), LoginStatus> {
        let initiator = keys
            .get("InitiatorName")
            .ok_or(LoginStatus::MISSING_PARAMETER)?;
        self.initiator = Some(initiator.to_string());
        let kind = match keys.get("SessionType").unwrap_or("Normal") {
            "Discovery" => SessionKind::Discovery,
            "Normal" => {
                let target_name = keys
                    .get("TargetName")
                    .ok_or(LoginStatus::MISSING_PARAMETER)?;
                let volume = config
                    .volume_of(target_name, exports)
                    .ok_or(LoginStatus::NOT_FOUND)?;
                SessionKind::Normal {
                    volume: volume.name,
                    target_name: target_name.to_string(),
                }
            }
            _ => return Err(LoginStatus::UNSUPPORTED_SESSION_TYPE),
        };
        self.access = match &kind {
            // Discovery sessions are never authenticated; they list only what the
            // initiator may log in to.
            SessionKind::Discovery => OPEN.clone(),
            SessionKind::Normal { volume, .. } => match config.access_for(volume, exports) {
                Some(access) if access.allows(initiator) => access.clone(),
                _ => return Err(LoginStatus::AUTHORIZATION_FAILED),
            },
        };
        if let SessionKind::Normal { .. } = kind {
            out.push("TargetPortalGroupTag", "1");
        }
        let discovery = kind == SessionKind::Discovery;
        self.negotiator = Some(Negotiator::new(Limits::default(), discovery));
        self.kind = Some(kind);
        if self.access.chap.is_none() && !matches!(self.auth, Auth::Chap(_)) {
            // Nothing to prove: a login may move on without security negotiation.
            self.auth = Auth::Done;
        }
        Ok(())
    }

    fn authenticate(&mut self, keys: &TextPairs, out: &mut TextPairs) -> Result<(), LoginStatus> {
        let fail = |_: ChapError| LoginStatus::AUTHENTICATION_FAILED;
        if let Some(methods) = keys.get("AuthMethod") {
            let offered: Vec<&str> = methods.split(',').collect();
            let choice = if self.access.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            if !offered.contains(&choice) {
                out.push("AuthMethod", "Reject");
                return Err(LoginStatus::AUTHENTICATION_FAILED);
            }
            out.push("AuthMethod", choice);
            if choice == "CHAP" {
                let (id, challenge) = chap::random_challenge();
                self.auth = Auth::Chap(ChapExchange::new(id, challenge));
            }
        }
        match &mut self.auth {
            Auth::Chap(x) => {
                if let Some(a) = keys.get("CHAP_A") {
                    x.on_algorithms(a, out).map_err(fail)?;
                }
                if keys.get("CHAP_R").is_some() {
                    if !x.challenged() {
                        return Err(LoginStatus::AUTHENTICATION_FAILED);
                    }
                    let expected = self.access.chap.as_ref().expect("CHAP is configured");
                    x.on_response(keys, expected, self.access.mutual_chap.as_ref(), out)
                        .map_err(fail)?;
                    self.auth = Auth::Done;
                }
            }
            Auth::Pending if self.access.chap.is_some() && keys.get("CHAP_A").is_some() => {
                return Err(LoginStatus::AUTHENTICATION_FAILED);
            }
            _ => {}
        }
        Ok(())
    }
}

impl IscsiConfig {
    /// The volume export a target IQN names, if it exists.
    pub fn volume_of(&self, target_name: &str, exports: &dyn Exports) -> Option<ExportInfo> {
        let volume = target_name
            .strip_prefix(&self.iqn_prefix)?
            .strip_prefix(':')?;
        if volume.contains('@') {
            return None;
        }
        exports.lookup(volume)
    }

    /// The IQN of a volume's target.
    pub fn target_name(&self, volume: &str) -> String {
        format!("{}:{}", self.iqn_prefix, volume)
    }
}

#[cfg(test)]
mod tests {
    use super::super::chap::{encode_hex, response, ChapCredentials};
    use super::super::pdu::LoginRequest;
    use super::*;
    use crate::export::ExportInfo;
    use tessel_engine::VolumeId;

    fn exports() -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol0".into(),
            description: String::new(),
            volume: VolumeId(1),
            size: 1 << 20,
            block_size: 512,
            read_only: false,
        }]
    }

    fn req(csg: u8, nsg: u8, transit: bool) -> LoginRequest {
        LoginRequest {
            transit,
            cont: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0; 6],
            tsih: 0,
            itt: 1,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        }
    }

    fn text(pairs: &[(&str, &str)]) -> Vec<u8> {
        TextPairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .encode()
    }

    const NORMAL: &[(&str, &str)] = &[
        ("InitiatorName", "iqn.x:host"),
        ("TargetName", "iqn.2026-11.dev.tessel:vol0"),
    ];

    fn chap_config() -> IscsiConfig {
        let mut c = IscsiConfig::default();
        c.targets.push(TargetAccess {
            volume: "vol0".into(),
            chap: Some(ChapCredentials {
                user: "alice".into(),
                secret: "secretsecret".into(),
            }),
            ..TargetAccess::default()
        });
        c
    }

    #[test]
    fn login_without_auth_may_skip_security() {
        let mut l = Login::new();
        let cfg = IscsiConfig::default();
        let r = l
            .step(&req(1, 3, true), &text(NORMAL), &cfg, &exports())
            .unwrap();
        assert!(r.transit);
        assert_eq!(r.keys.get("TargetPortalGroupTag"), Some("1"));
        assert_eq!(r.keys.get("MaxRecvDataSegmentLength"), Some("262144"));
    }

    #[test]
    fn unknown_targets_and_missing_names_fail() {
        let cfg = IscsiConfig::default();
        let bad = text(&[
            ("InitiatorName", "i"),
            ("TargetName", "iqn.2026-11.dev.tessel:nope"),
        ]);
        assert_eq!(
            Login::new()
                .step(&req(0, 1, true), &bad, &cfg, &exports())
                .unwrap_err(),
            LoginStatus::NOT_FOUND
        );
        let snap = text(&[
            ("InitiatorName", "i"),
            ("TargetName", "iqn.2026-11.dev.tessel:vol0@s"),
        ]);
        assert_eq!(
            Login::new()
                .step(&req(0, 1, true), &snap, &cfg, &exports())
                .unwrap_err(),
            LoginStatus::NOT_FOUND
        );
        let none = text(&[("TargetName", "iqn.2026-11.dev.tessel:vol0")]);
        assert_eq!(
            Login::new()
                .step(&req(0, 1, true), &none, &cfg, &exports())
                .unwrap_err(),
            LoginStatus::MISSING_PARAMETER
        );
    }

    #[test]
    fn initiators_outside_the_allow_list_are_refused() {
        let mut cfg = IscsiConfig::default();
        cfg.targets.push(TargetAccess {
            volume: "vol*".into(),
            allowed_initiators: vec!["iqn.x:other".into()],
            ..TargetAccess::default()
        });
        let e = Login::new()
            .step(&req(0, 1, true), &text(NORMAL), &cfg, &exports())
            .unwrap_err();
        assert_eq!(e, LoginStatus::AUTHORIZATION_FAILED);
    }

    #[test]
    fn volumes_no_rule_covers_are_refused_when_unmatched_is_deny() {
        let mut cfg = IscsiConfig {
            unmatched: super::super::Unmatched::Deny,
            ..IscsiConfig::default()
        };
        let e = Login::new()
            .step(&req(0, 1, true), &text(NORMAL), &cfg, &exports())
            .unwrap_err();
        assert_eq!(e, LoginStatus::AUTHORIZATION_FAILED);
        cfg.targets.push(TargetAccess {
            volume: "v?l*".into(),
            ..TargetAccess::default()
        });
        assert!(
            Login::new()
                .step(&req(1, 3, true), &text(NORMAL), &cfg, &exports())
                .unwrap()
                .transit
        );
    }

    #[test]
    fn chap_required_refuses_skipping_security_and_none() {
        let cfg = chap_config();
        let e = Login::new()
            .step(&req(1, 3, true), &text(NORMAL), &cfg, &exports())
            .unwrap_err();
        assert_eq!(e, LoginStatus::AUTHENTICATION_FAILED);
        let mut keys = NORMAL.to_vec();
        keys.push(("AuthMethod", "None"));
        let e = Login::new()
            .step(&req(0, 1, true), &text(&keys), &cfg, &exports())
            .unwrap_err();
        assert_eq!(e, LoginStatus::AUTHENTICATION_FAILED);
    }

    fn chap_login(secret: &str) -> Result<LoginReply, LoginStatus> {
        let cfg = chap_config();
        let mut l = Login::new();
        let mut keys = NORMAL.to_vec();
        keys.push(("AuthMethod", "CHAP,None"));
        let r = l.step(&req(0, 1, true), &text(&keys), &cfg, &exports())?;
        assert_eq!(r.keys.get("AuthMethod"), Some("CHAP"));
        assert!(!r.transit);
        let r = l.step(
            &req(0, 1, true),
            &text(&[("CHAP_A", "5")]),
            &cfg,
            &exports(),
        )?;
        let id: u8 = r.keys.get("CHAP_I").unwrap().parse().unwrap();
        let c = chap::decode_binary(r.keys.get("CHAP_C").unwrap()).unwrap();
        let resp = encode_hex(&response(id, secret.as_bytes(), &c));
        l.step(
            &req(0, 1, true),
            &text(&[("CHAP_N", "alice"), ("CHAP_R", &resp)]),
            &cfg,
            &exports(),
        )
    }

    #[test]
    fn chap_accepts_the_right_secret_and_refuses_a_wrong_one() {
        assert!(chap_login("secretsecret").unwrap().transit);
        assert_eq!(
            chap_login("wrongsecret!").unwrap_err(),
            LoginStatus::AUTHENTICATION_FAILED
        );
    }

    #[test]
    fn discovery_sessions_need_no_target() {
        let cfg = IscsiConfig::default();
        let mut l = Login::new();
        let keys = text(&[
            ("InitiatorName", "i"),
            ("SessionType", "Discovery"),
            ("HeaderDigest", "CRC32C,None"),
        ]);
        let r = l.step(&req(0, 3, true), &keys, &cfg, &exports()).unwrap();
        assert!(r.transit);
        assert_eq!(r.keys.get("HeaderDigest"), Some("None"));
        assert_eq!(l.kind(), Some(&SessionKind::Discovery));
    }

    #[test]
    fn continued_text_is_joined_before_parsing() {
        let cfg = IscsiConfig::default();
        let mut l = Login::new();
        let all = text(NORMAL);
        let mut first = req(1, 3, true);
        first.cont = true;
        first.transit = false;
        let r = l.step(&first, &all[..10], &cfg, &exports()).unwrap();
        assert!(r.keys.is_empty() && !r.transit);
        assert!(
            l.step(&req(1, 3, true), &all[10..], &cfg, &exports())
                .unwrap()
                .transit
        );
    }

    #[test]
    fn unsupported_versions_and_reconnects_fail() {
        let cfg = IscsiConfig::default();
        let mut r = req(0, 1, true);
        r.version_min = 1;
        assert_eq!(
            Login::new()
                .step(&r, &text(NORMAL), &cfg, &exports())
                .unwrap_err(),
            LoginStatus::UNSUPPORTED_VERSION
        );
        let mut r = req(0, 1, true);
        r.tsih = 5;
        assert_eq!(
            Login::new()
                .step(&r, &text(NORMAL), &cfg, &exports())
                .unwrap_err(),
            LoginStatus::SESSION_DOES_NOT_EXIST
        );
    }
}
