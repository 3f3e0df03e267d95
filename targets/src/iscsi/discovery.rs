//! SendTargets (RFC 7143 appendix C): the targets an initiator may see, as text keys.

use super::text::TextPairs;
use super::IscsiConfig;
use crate::export::Exports;

/// Answers `SendTargets=<value>` for `initiator`; `current` is a Normal session's volume.
pub fn send_targets(
    value: &str,
    initiator: &str,
    current: Option<&str>,
    config: &IscsiConfig,
    exports: &dyn Exports,
) -> TextPairs {
    let mut out = TextPairs::default();
    let volumes = exports
        .list()
        .into_iter()
        .filter(|e| !e.name.contains('@'))
        .map(|e| e.name);
    for volume in volumes {
        let name = config.target_name(&volume);
        let wanted = match value {
            "All" => true,
            "" => current == Some(volume.as_str()),
            named => named == name,
        };
        if wanted && config.may_log_in(initiator, &volume, exports) {
            out.push("TargetName", name);
            out.push("TargetAddress", format!("{},1", config.portal));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{TargetAccess, Unmatched};
    use super::*;
    use crate::export::ExportInfo;
    use tessel_engine::VolumeId;

    fn export(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: String::new(),
            volume: VolumeId(1),
            size: 4096,
            block_size: 512,
            read_only: name.contains('@'),
        }
    }

    #[test]
    fn send_targets_lists_volumes_not_snapshots_and_only_those_the_initiator_may_log_in_to() {
        let exports = vec![export("a"), export("a@s1"), export("b")];
        let mut cfg = IscsiConfig::default();
        cfg.targets.push(TargetAccess {
            volume: "b".into(),
            allowed_initiators: vec!["iqn.x:only".into()],
            ..TargetAccess::default()
        });
        let out = send_targets("All", "iqn.x:host", None, &cfg, &exports);
        assert_eq!(
            out.0,
            vec![
                (
                    "TargetName".to_string(),
                    "iqn.2026-11.dev.tessel:a".to_string()
                ),
                ("TargetAddress".to_string(), "127.0.0.1:3260,1".to_string()),
            ]
        );
        assert_eq!(
            send_targets("All", "iqn.x:only", None, &cfg, &exports)
                .0
                .len(),
            4
        );
        assert_eq!(
            send_targets("", "iqn.x:host", Some("a"), &cfg, &exports)
                .0
                .len(),
            2
        );
        assert!(send_targets("iqn.nope", "iqn.x:host", None, &cfg, &exports).is_empty());
        // Volumes no rule covers are refused, so not listed either: only b, to its initiator.
        cfg.unmatched = Unmatched::Deny;
        assert!(send_targets("All", "iqn.x:host", None, &cfg, &exports).is_empty());
        let only = send_targets("All", "iqn.x:only", None, &cfg, &exports);
        assert_eq!(only.get("TargetName"), Some("iqn.2026-11.dev.tessel:b"));
        assert_eq!(only.0.len(), 2);
    }
}
