//! The rule for names of volumes, snapshots and pools.

/// The rule [`valid_name`] checks, for error messages (the engine's and the configuration's).
pub const NAME_RULE: &str = "1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'";

/// Names of volumes, snapshots and pools. They become export names, IQN parts, file names
/// and command-line arguments, so `.`, `..` (paths) and a leading '-' (an option) are out.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}
