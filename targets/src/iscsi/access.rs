//! Who may log in to which target: rules matched by volume name or pattern, inherited by a
//! clone from the volume it was cloned from, and a policy for volumes no rule covers.
//!
//! The rule of a volume is, most specific first: the rule naming it exactly; else the rule
//! of the volume it was cloned from (found the same way, so a clone of a clone goes back
//! to the first volume a rule covers), because a clone holds that volume's data; else the
//! first rule, in file order, whose pattern matches its name. A volume with no rule is
//! open or refused as `Unmatched` says. Snapshots are LUNs of their volume's target, so
//! they follow its rule. See docs/iscsi.md, "Access rules".

use super::chap::ChapCredentials;
use super::IscsiConfig;
use crate::export::Exports;

/// Who may log in to the targets of the volumes a rule covers, and how they authenticate.
#[derive(Clone, Debug, Default)]
pub struct TargetAccess {
    /// A volume name, or a pattern where `*` stands for any run of characters and `?` for
    /// one character.
    pub volume: String,
    /// Initiator IQNs allowed to log in; empty allows any.
    pub allowed_initiators: Vec<String>,
    /// CHAP credentials the initiator must prove; None: no authentication.
    pub chap: Option<ChapCredentials>,
    /// Credentials the target proves when the initiator asks for mutual CHAP.
    pub mutual_chap: Option<ChapCredentials>,
}

/// What happens to a volume that no rule covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Unmatched {
    /// Any initiator logs in without authentication.
    #[default]
    Allow,
    /// Logins are refused and discovery does not list it.
    Deny,
}

/// The rules of a volume no rule covers, when such volumes are open; also those of
/// discovery sessions, which are never authenticated.
pub static OPEN: TargetAccess = TargetAccess {
    volume: String::new(),
    allowed_initiators: Vec::new(),
    chap: None,
    mutual_chap: None,
};

/// How many clones deep the origin of a volume is followed (a chain of clones of clones;
/// it also ends a loop made by deleting a volume and reusing its name for a clone).
const MAX_LINEAGE: usize = 32;

impl IscsiConfig {
    /// The rules a volume's target follows; None when no rule covers it and such volumes
    /// are refused. `exports` tells the volume each clone came from.
    pub fn access_for(&self, volume: &str, exports: &dyn Exports) -> Option<&TargetAccess> {
        match (self.rule_for(volume, exports, 0), self.unmatched) {
            (Some(rule), _) => Some(rule),
            (None, Unmatched::Allow) => Some(&OPEN),
            (None, Unmatched::Deny) => None,
        }
    }

    /// True when `initiator` may log in to `volume`'s target (given the right CHAP secret,
    /// when its rule asks for one): what discovery lists.
    pub fn may_log_in(&self, initiator: &str, volume: &str, exports: &dyn Exports) -> bool {
        self.access_for(volume, exports)
            .is_some_and(|rule| rule.allows(initiator))
    }

    fn rule_for(&self, volume: &str, exports: &dyn Exports, depth: usize) -> Option<&TargetAccess> {
        if let Some(rule) = self.targets.iter().find(|t| t.volume == volume) {
            return Some(rule);
        }
        let inherited = match exports.origin(volume) {
            Some(origin) if depth < MAX_LINEAGE => self.rule_for(&origin, exports, depth + 1),
            _ => None,
        };
        inherited.or_else(|| self.targets.iter().find(|t| matches(&t.volume, volume)))
    }
}

impl TargetAccess {
    /// True when `initiator` may log in.
    pub fn allows(&self, initiator: &str) -> bool {
        self.allowed_initiators.is_empty() || self.allowed_initiators.iter().any(|i| i == initiator)
    }
}

/// True when `pattern` is a volume pattern: volume-name characters and at least one `*`
/// or `?` (a rule's `volume` is either this or a volume name).
pub fn is_pattern(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
        && pattern.len() <= 256
        && pattern
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-*?".contains(c))
}

/// Glob matching of `*` (any run, also empty) and `?` (one character). Linear: on a
/// mismatch only the last `*` is moved on, which is enough without character classes.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    // After the last `*` seen: the pattern index behind it, and the name index it covers to.
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        match p.get(i) {
            Some(b'*') => {
                star = Some((i + 1, j));
                i += 1;
            }
            Some(&c) if c == b'?' || c == n[j] => {
                i += 1;
                j += 1;
            }
            _ => match star {
                Some((after, covered)) => {
                    star = Some((after, covered + 1));
                    i = after;
                    j = covered + 1;
                }
                None => return false,
            },
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportInfo;
    use std::collections::HashMap;

    #[test]
    fn patterns_match_any_run_with_star_and_one_character_with_question_mark() {
        for (pattern, name) in [
            ("db-*", "db-1"),
            ("db-*", "db-"),
            ("*", "x"),
            ("*-prod", "web-prod"),
            ("a*b*c", "aXXbYYc"),
            ("a*b", "abab"),
            ("v?l", "vol"),
            ("vol0", "vol0"),
        ] {
            assert!(matches(pattern, name), "{pattern} should match {name}");
        }
        for (pattern, name) in [
            ("db-*", "db"),
            ("db-*", "xdb-1"),
            ("*-prod", "web-prod2"),
            ("a*b*c", "aXXbYY"),
            ("v?l", "vl"),
            ("vol0", "vol00"),
        ] {
            assert!(!matches(pattern, name), "{pattern} should not match {name}");
        }
        assert!(is_pattern("db-*") && is_pattern("v?l"));
        assert!(!is_pattern("vol0") && !is_pattern("db/*") && !is_pattern("a b*"));
    }

    /// Volumes with the volume each was cloned from.
    struct Lineage(HashMap<&'static str, &'static str>);

    impl Exports for Lineage {
        fn list(&self) -> Vec<ExportInfo> {
            Vec::new()
        }
        fn lookup(&self, _: &str) -> Option<ExportInfo> {
            None
        }
        fn origin(&self, volume: &str) -> Option<String> {
            self.0.get(volume).map(|o| o.to_string())
        }
    }

    fn rule(volume: &str, initiator: &str) -> TargetAccess {
        TargetAccess {
            volume: volume.into(),
            allowed_initiators: vec![initiator.into()],
            ..TargetAccess::default()
        }
    }

    #[test]
    fn a_volume_takes_its_own_rule_then_its_origins_then_a_pattern_then_the_default() {
        let config = IscsiConfig {
            targets: vec![rule("scratch-*", "s"), rule("db", "d"), rule("*", "any")],
            unmatched: Unmatched::Deny,
            ..IscsiConfig::default()
        };
        let lineage = Lineage(HashMap::from([
            ("scratch-db", "db"),
            ("scratch-copy", "scratch-db"),
            ("loop-a", "loop-b"),
            ("loop-b", "loop-a"),
        ]));
        let of = |v| config.access_for(v, &lineage).map(|r| r.volume.as_str());
        assert_eq!(of("db"), Some("db"));
        assert_eq!(of("scratch-1"), Some("scratch-*"));
        // A clone of db holds db's data: db's rule, although its name matches a pattern.
        assert_eq!(of("scratch-db"), Some("db"));
        assert_eq!(of("scratch-copy"), Some("db"), "a clone of a clone");
        assert_eq!(of("loop-a"), Some("*"), "a loop of origins ends");
        assert_eq!(of("web"), Some("*"));
        let config = IscsiConfig {
            targets: vec![rule("db", "d")],
            unmatched: Unmatched::Deny,
            ..IscsiConfig::default()
        };
        assert!(config.access_for("web", &lineage).is_none());
        assert!(!config.may_log_in("d", "web", &lineage));
        assert!(config.may_log_in("d", "scratch-copy", &lineage));
        assert!(!config.may_log_in("x", "scratch-copy", &lineage));
        let open = IscsiConfig {
            unmatched: Unmatched::Allow,
            ..config
        };
        assert!(open.may_log_in("x", "web", &lineage));
    }
}
