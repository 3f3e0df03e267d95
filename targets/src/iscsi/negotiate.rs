//! Operational key negotiation (RFC 7143 sections 6 and 13): each key's rule (declarative,
//! list, Boolean OR / AND, numerical min / max), its range, and the answer to send.

use super::text::TextPairs;

/// What this target is willing to use; the negotiation result never exceeds these.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The MaxRecvDataSegmentLength we declare (what we accept in one PDU).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    /// Whether we accept immediate data (ImmediateData is an AND key).
    pub immediate_data: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_recv_data_segment_length: 262_144,
            max_burst_length: 1_048_576,
            first_burst_length: 262_144,
            max_outstanding_r2t: 16,
            default_time2wait: 2,
            default_time2retain: 0,
            immediate_data: true,
        }
    }
}

/// The operational parameters of a session, RFC defaults until negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_connections: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Largest data segment we may send (the initiator's declaration).
    pub peer_max_recv_data_segment_length: u32,
    /// Largest data segment we accept (our declaration).
    pub max_recv_data_segment_length: u32,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    pub max_outstanding_r2t: u32,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u32,
}

impl Default for Params {
    fn default() -> Params {
        Params {
            header_digest: false,
            data_digest: false,
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            peer_max_recv_data_segment_length: 8192,
            max_recv_data_segment_length: 8192,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// The answer to one offered key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A value to send back.
    Value(String),
    /// Declarative key: nothing to answer.
    Silent,
    /// The key is unknown to us.
    NotUnderstood,
    /// The key does not apply in this session.
    Irrelevant,
    /// The value is outside the key's range or syntax.
    Reject,
}

/// Negotiates the operational keys of one login.
#[derive(Clone, Debug)]
pub struct Negotiator {
    /// The parameters as negotiated so far.
    pub params: Params,
    limits: Limits,
    discovery: bool,
    declared_mrdsl: bool,
}

fn yes_no(v: bool) -> String {
    if v { "Yes" } else { "No" }.to_string()
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

/// Numerical values are decimal, or hex with a 0x prefix (RFC 7143 5.1).
fn parse_num(v: &str, lo: u32, hi: u32) -> Option<u32> {
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v.parse().ok()?,
        None => return None,
    };
    (u64::from(lo)..=u64::from(hi))
        .contains(&n)
        .then_some(n as u32)
}

/// Keys that only matter for Normal sessions (RFC 7143: "Irrelevant when SessionType=Discovery").
const NORMAL_ONLY: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
];

impl Negotiator {
    /// A negotiator for a Normal or a Discovery session.
    pub fn new(limits: Limits, discovery: bool) -> Negotiator {
        let params = Params {
            max_recv_data_segment_length: limits.max_recv_data_segment_length,
            ..Params::default()
        };
        Negotiator {
            params,
            limits,
            discovery,
            declared_mrdsl: false,
        }
    }

    /// Answers one offered operational key, updating the parameters.
    pub fn offer(&mut self, key: &str, value: &str) -> Answer {
        if self.discovery && NORMAL_ONLY.contains(&key) {
            return Answer::Irrelevant;
        }
        let l = &self.limits;
        let p = &mut self.params;
        let num = |lo, hi| parse_num(value, lo, hi);
        match key {
            "HeaderDigest" | "DataDigest" => {
                // List rule: the first of the initiator's choices we accept. Discovery
                // sessions never use digests.
                let pick = value
                    .split(',')
                    .find(|v| *v == "None" || (*v == "CRC32C" && !self.discovery));
                match pick {
                    Some(v) => {
                        let on = v == "CRC32C";
                        if key == "HeaderDigest" {
                            p.header_digest = on;
                        } else {
                            p.data_digest = on;
                        }
                        Answer::Value(v.to_string())
                    }
                    None => Answer::Reject,
                }
            }
            "MaxRecvDataSegmentLength" => match num(512, (1 << 24) - 1) {
                Some(n) => {
                    p.peer_max_recv_data_segment_length = n;
                    self.declared_mrdsl = true;
                    Answer::Value(l.max_recv_data_segment_length.to_string())
                }
                None => Answer::Reject,
            },
            "MaxConnections" => self.min(value, 1, 65535, 1, |p, n| p.max_connections = n),
            "MaxBurstLength" => {
                let ours = l.max_burst_length;
                self.min(value, 512, (1 << 24) - 1, ours, |p, n| {
                    p.max_burst_length = n
                })
            }
            "FirstBurstLength" => {
                let ours = l.first_burst_length;
                self.min(value, 512, (1 << 24) - 1, ours, |p, n| {
                    p.first_burst_length = n
                })
            }
            "MaxOutstandingR2T" => {
                let ours = l.max_outstanding_r2t;
                self.min(value, 1, 65535, ours, |p, n| p.max_outstanding_r2t = n)
            }
            "DefaultTime2Retain" => {
                let ours = l.default_time2retain;
                self.min(value, 0, 3600, ours, |p, n| p.default_time2retain = n)
            }
            "ErrorRecoveryLevel" => self.min(value, 0, 2, 0, |p, n| p.error_recovery_level = n),
            "DefaultTime2Wait" => match num(0, 3600) {
                Some(n) => {
                    p.default_time2wait = n.max(l.default_time2wait);
                    Answer::Value(p.default_time2wait.to_string())
                }
                None => Answer::Reject,
            },
            // OR: Yes if either side wants Yes; we are content with No.
            "InitialR2T" => self.boolean(value, |a| a, |p, v| p.initial_r2t = v),
            // AND: Yes only if both want it.
            "ImmediateData" => {
                let ours = l.immediate_data;
                self.boolean(value, |a| a && ours, |p, v| p.immediate_data = v)
            }
            // OR with our Yes: we only handle in-order data.
            "DataPDUInOrder" => self.boolean(value, |_| true, |p, v| p.data_pdu_in_order = v),
            "DataSequenceInOrder" => {
                self.boolean(value, |_| true, |p, v| p.data_sequence_in_order = v)
            }
            // AND with our No: markers and RDMA are not offered.
            "IFMarker" | "OFMarker" | "RDMAExtensions" => self.boolean(value, |_| false, |_, _| ()),
            "IFMarkInt" | "OFMarkInt" => Answer::Irrelevant,
            "iSCSIProtocolLevel" => match num(0, 31) {
                Some(n) => Answer::Value(n.min(1).to_string()),
                None => Answer::Reject,
            },
            "TaskReporting" => {
                if value.split(',').any(|v| v == "RFC3720") {
                    Answer::Value("RFC3720".to_string())
                } else {
                    Answer::Reject
                }
            }
            "InitiatorAlias" => Answer::Silent,
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => Answer::Irrelevant,
            _ => Answer::NotUnderstood,
        }
    }

    fn min(
        &mut self,
        value: &str,
        lo: u32,
        hi: u32,
        ours: u32,
        set: impl Fn(&mut Params, u32),
    ) -> Answer {
        match parse_num(value, lo, hi) {
            Some(n) => {
                let n = n.min(ours);
                set(&mut self.params, n);
                Answer::Value(n.to_string())
            }
            None => Answer::Reject,
        }
    }

    fn boolean(
        &mut self,
        value: &str,
        result: impl Fn(bool) -> bool,
        set: impl Fn(&mut Params, bool),
    ) -> Answer {
        match parse_bool(value) {
            Some(offered) => {
                let v = result(offered);
                set(&mut self.params, v);
                Answer::Value(yes_no(v))
            }
            None => Answer::Reject,
        }
    }

    /// Appends the answer to `key` to `out` (RFC 7143 special values for the non-values).
    pub fn answer_into(&mut self, key: &str, value: &str, out: &mut TextPairs) {
        let text = match self.offer(key, value) {
            Answer::Value(v) => v,
            Answer::Silent => return,
            Answer::NotUnderstood => "NotUnderstood".to_string(),
            Answer::Irrelevant => "Irrelevant".to_string(),
            Answer::Reject => "Reject".to_string(),
        };
        out.push(key, text);
    }

    /// Declarations we owe at the end of operational negotiation (our receive limit), and
    /// the final consistency rule FirstBurstLength <= MaxBurstLength.
    pub fn finish(&mut self, out: &mut TextPairs) {
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            out.push(
                "MaxRecvDataSegmentLength",
                self.limits.max_recv_data_segment_length.to_string(),
            );
        }
        let p = &mut self.params;
        p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normal() -> Negotiator {
        Negotiator::new(Limits::default(), false)
    }

    #[test]
    fn digests_take_the_initiators_first_acceptable_choice() {
        let mut n = normal();
        assert_eq!(
            n.offer("HeaderDigest", "CRC32C,None"),
            Answer::Value("CRC32C".into())
        );
        assert_eq!(
            n.offer("DataDigest", "None,CRC32C"),
            Answer::Value("None".into())
        );
        assert!(n.params.header_digest && !n.params.data_digest);
        assert_eq!(n.offer("DataDigest", "MD5"), Answer::Reject);
    }

    #[test]
    fn discovery_sessions_never_use_digests() {
        let mut n = Negotiator::new(Limits::default(), true);
        assert_eq!(
            n.offer("HeaderDigest", "CRC32C,None"),
            Answer::Value("None".into())
        );
        assert_eq!(n.offer("DataDigest", "CRC32C"), Answer::Reject);
        assert_eq!(n.offer("InitialR2T", "Yes"), Answer::Irrelevant);
        assert!(!n.params.header_digest);
    }

    #[test]
    fn numerical_keys_follow_min_and_max() {
        let mut n = normal();
        assert_eq!(
            n.offer("MaxBurstLength", "16776192"),
            Answer::Value("1048576".into())
        );
        assert_eq!(
            n.offer("FirstBurstLength", "0x2000"),
            Answer::Value("8192".into())
        );
        assert_eq!(n.offer("MaxOutstandingR2T", "1"), Answer::Value("1".into()));
        assert_eq!(n.offer("DefaultTime2Wait", "0"), Answer::Value("2".into()));
        assert_eq!(
            n.offer("DefaultTime2Retain", "20"),
            Answer::Value("0".into())
        );
        assert_eq!(
            n.offer("ErrorRecoveryLevel", "2"),
            Answer::Value("0".into())
        );
        assert_eq!(n.offer("MaxConnections", "8"), Answer::Value("1".into()));
        assert_eq!(n.offer("MaxBurstLength", "100"), Answer::Reject);
        assert_eq!(n.offer("MaxBurstLength", "12ab"), Answer::Reject);
    }

    #[test]
    fn booleans_follow_or_and_and() {
        let mut n = Negotiator::new(
            Limits {
                immediate_data: true,
                ..Limits::default()
            },
            false,
        );
        assert_eq!(n.offer("InitialR2T", "No"), Answer::Value("No".into()));
        assert_eq!(n.offer("InitialR2T", "Yes"), Answer::Value("Yes".into()));
        assert_eq!(n.offer("ImmediateData", "Yes"), Answer::Value("Yes".into()));
        assert_eq!(n.offer("ImmediateData", "No"), Answer::Value("No".into()));
        let mut no = Negotiator::new(
            Limits {
                immediate_data: false,
                ..Limits::default()
            },
            false,
        );
        assert_eq!(no.offer("ImmediateData", "Yes"), Answer::Value("No".into()));
        assert_eq!(n.offer("DataPDUInOrder", "No"), Answer::Value("Yes".into()));
        assert_eq!(n.offer("IFMarker", "Yes"), Answer::Value("No".into()));
        assert_eq!(n.offer("ImmediateData", "Maybe"), Answer::Reject);
    }

    #[test]
    fn declarative_mrdsl_is_answered_with_ours_and_declared_once() {
        let mut n = normal();
        assert_eq!(
            n.offer("MaxRecvDataSegmentLength", "65536"),
            Answer::Value("262144".into())
        );
        assert_eq!(n.params.peer_max_recv_data_segment_length, 65536);
        let mut out = TextPairs::default();
        n.finish(&mut out);
        assert!(out.is_empty());
        let mut fresh = normal();
        fresh.finish(&mut out);
        assert_eq!(out.get("MaxRecvDataSegmentLength"), Some("262144"));
    }

    #[test]
    fn unknown_keys_are_not_understood() {
        let mut n = normal();
        let mut out = TextPairs::default();
        n.answer_into("X-com.example.Foo", "1", &mut out);
        n.answer_into("InitiatorAlias", "host", &mut out);
        assert_eq!(
            out.0,
            vec![("X-com.example.Foo".to_string(), "NotUnderstood".to_string())]
        );
    }

    #[test]
    fn first_burst_never_exceeds_max_burst() {
        let mut n = normal();
        n.offer("MaxBurstLength", "8192");
        n.offer("FirstBurstLength", "65536");
        n.finish(&mut TextPairs::default());
        assert_eq!(n.params.first_burst_length, 8192);
    }
}
