//! Checks that need the whole file: references between sections, duplicate names, and
//! values whose range serde cannot express.

use std::collections::HashSet;

use super::{Config, Cores, EngineConfig, IscsiConfig, LimitsConfig};

impl Config {
    /// The semantic checks run after parsing; the first problem wins.
    pub(super) fn check(&self) -> Result<(), Problem> {
        self.engine.check()?;
        self.limits.check()?;
        let mut pools = HashSet::new();
        for (i, pool) in self.pools.iter().enumerate() {
            let at = |key| vec![Seg::Key("pool"), Seg::Index(i), Seg::Key(key)];
            check_name(&pool.name, "pool", at("name"))?;
            if !pools.insert(pool.name.as_str()) {
                return Err(Problem::new(
                    at("name"),
                    format!("duplicate pool name '{}'", pool.name),
                ));
            }
            if pool.devices.is_empty() {
                return Err(Problem::new(
                    at("devices"),
                    "a pool needs at least one device",
                ));
            }
            let cluster = pool.cluster_size.0;
            if !cluster.is_power_of_two() || !(4 << 10..=1 << 20).contains(&cluster) {
                return Err(Problem::new(
                    at("cluster_size"),
                    format!(
                        "cluster size {} is not a power of two from 4K to 1M",
                        pool.cluster_size
                    ),
                ));
            }
            if pool.create_size.is_some_and(|s| s.0 < cluster) {
                return Err(Problem::new(
                    at("create_size"),
                    "create_size is smaller than one cluster",
                ));
            }
        }
        let mut volumes = HashSet::new();
        for (i, volume) in self.volumes.iter().enumerate() {
            let at = |key| vec![Seg::Key("volume"), Seg::Index(i), Seg::Key(key)];
            check_name(&volume.name, "volume", at("name"))?;
            if !volumes.insert(volume.name.as_str()) {
                return Err(Problem::new(
                    at("name"),
                    format!("duplicate volume name '{}'", volume.name),
                ));
            }
            if !pools.contains(volume.pool.as_str()) {
                return Err(Problem::new(
                    at("pool"),
                    format!(
                        "unknown pool '{}', expected one of the [[pool]] names",
                        volume.pool
                    ),
                ));
            }
            if !matches!(volume.block_size, 512 | 4096) {
                return Err(Problem::new(
                    at("block_size"),
                    format!("block size {} is not 512 or 4096", volume.block_size),
                ));
            }
            if volume.size.0 == 0 || volume.size.0 % u64::from(volume.block_size) != 0 {
                return Err(Problem::new(
                    at("size"),
                    format!(
                        "size {} is not a positive multiple of the block size {}",
                        volume.size.0, volume.block_size
                    ),
                ));
            }
        }
        let known_volume = |name: &str, path: Vec<Seg<'static>>| {
            if volumes.contains(name) {
                Ok(())
            } else {
                Err(Problem::new(
                    path,
                    format!("unknown volume '{name}', expected one of the [[volume]] names"),
                ))
            }
        };
        self.iscsi.check()?;
        let mut exports = HashSet::new();
        for (i, export) in self.exports.iter().enumerate() {
            let at = |key| vec![Seg::Key("export"), Seg::Index(i), Seg::Key(key)];
            known_volume(&export.volume, at("volume"))?;
            if let Some(snapshot) = &export.snapshot {
                check_name(snapshot, "snapshot", at("snapshot"))?;
            }
            if export.tls.is_some() && self.nbd.tls.is_none() {
                return Err(Problem::new(
                    at("tls"),
                    "an export's tls needs the NBD TLS credentials in [nbd.tls]",
                ));
            }
            if !exports.insert(export.name()) {
                return Err(Problem::new(
                    at("volume"),
                    format!("duplicate export '{}'", export.name()),
                ));
            }
        }
        let mut scheduled = HashSet::new();
        for (i, schedule) in self.schedules.iter().enumerate() {
            let at = |key| vec![Seg::Key("schedule"), Seg::Index(i), Seg::Key(key)];
            known_volume(&schedule.volume, at("volume"))?;
            if !scheduled.insert(schedule.volume.as_str()) {
                return Err(Problem::new(
                    at("volume"),
                    format!("volume '{}' already has a schedule", schedule.volume),
                ));
            }
            if schedule.every.is_zero() {
                return Err(Problem::new(
                    at("every"),
                    "the interval must be at least 1s",
                ));
            }
            if schedule.keep == 0 {
                return Err(Problem::new(at("keep"), "keep must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Longest adaptive spin: beyond a second a reactor is a busy poller that also sleeps.
const MAX_SPIN_US: u64 = 1_000_000;

impl Config {
    /// Checks against the machine the daemon runs on: every listed core is one this
    /// process may run on (a reactor pinned elsewhere would not run where configured).
    pub(super) fn check_host(&self, usable: &[usize]) -> Result<(), Problem> {
        if let Cores::List(ids) = &self.engine.cores {
            if let Some(id) = ids.iter().find(|id| !usable.contains(id)) {
                let list: Vec<String> = usable.iter().map(usize::to_string).collect();
                return Err(Problem::new(
                    vec![Seg::Key("engine"), Seg::Key("cores")],
                    format!(
                        "core {id} is not online for this process (usable cores: {})",
                        list.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl EngineConfig {
    fn check(&self) -> Result<(), Problem> {
        let at = |key| vec![Seg::Key("engine"), Seg::Key(key)];
        if let Cores::List(ids) = &self.cores {
            let unique: HashSet<_> = ids.iter().collect();
            if ids.is_empty() || unique.len() != ids.len() {
                return Err(Problem::new(
                    at("cores"),
                    "the core list must be non-empty and without repeats",
                ));
            }
        }
        if self.spin_us > MAX_SPIN_US {
            return Err(Problem::new(
                at("spin_us"),
                format!(
                    "{} is above {MAX_SPIN_US} (one second); use poll = \"busy\" to spin for ever",
                    self.spin_us
                ),
            ));
        }
        if !self.ring_entries.is_power_of_two() || self.ring_entries > 32768 {
            return Err(Problem::new(
                at("ring_entries"),
                format!(
                    "{} is not a power of two from 1 to 32768",
                    self.ring_entries
                ),
            ));
        }
        if self.submit_batch == 0 || self.submit_batch > self.ring_entries {
            return Err(Problem::new(
                at("submit_batch"),
                format!(
                    "{} is not from 1 to ring_entries ({})",
                    self.submit_batch, self.ring_entries
                ),
            ));
        }
        if !is_log_filter(&self.log_level) {
            return Err(Problem::new(
                at("log_level"),
                format!(
                    "'{}' is not a level (off, error, warn, info, debug, trace) or \
                     directives like \"info,tessel_engine=debug\"",
                    self.log_level
                ),
            ));
        }
        Ok(())
    }
}

/// Largest NBD request payload: a connection's memory budget must let one through.
const MAX_REQUEST: u64 = 32 << 20;

impl LimitsConfig {
    fn check(&self) -> Result<(), Problem> {
        let at = |key| vec![Seg::Key("limits"), Seg::Key(key)];
        if self.connections == 0 {
            return Err(Problem::new(at("connections"), "must be at least 1"));
        }
        if self.connections_per_client == 0 || self.connections_per_client > self.connections {
            return Err(Problem::new(
                at("connections_per_client"),
                format!(
                    "{} is not from 1 to connections ({})",
                    self.connections_per_client, self.connections
                ),
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(Problem::new(at("handshake_timeout"), "must be at least 1s"));
        }
        if self.connection_memory.0 < 1 << 20 {
            return Err(Problem::new(at("connection_memory"), "must be at least 1M"));
        }
        if self.memory.0 < MAX_REQUEST.max(self.connection_memory.0) {
            return Err(Problem::new(
                at("memory"),
                format!(
                    "{} is below connection_memory or the largest request (32M): requests would wait for ever",
                    self.memory
                ),
            ));
        }
        Ok(())
    }
}

impl IscsiConfig {
    fn check(&self) -> Result<(), Problem> {
        if !self.iqn_prefix.starts_with("iqn.") || self.iqn_prefix.ends_with(':') {
            return Err(Problem::new(
                vec![Seg::Key("iscsi"), Seg::Key("iqn_prefix")],
                format!(
                    "'{}' is not an IQN prefix like \"iqn.2026-11.com.example\"",
                    self.iqn_prefix
                ),
            ));
        }
        let mut seen = HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            let at = |key| {
                vec![
                    Seg::Key("iscsi"),
                    Seg::Key("target"),
                    Seg::Index(i),
                    Seg::Key(key),
                ]
            };
            // Rules may name volumes that do not exist yet (created or cloned later).
            let pattern = tessel_targets::iscsi::access::is_pattern(&target.volume);
            if !pattern && !tessel_engine::valid_name(&target.volume) {
                return Err(Problem::new(
                    at("volume"),
                    format!(
                        "'{}' is neither a volume name ({}) nor a pattern of such \
                         characters with * or ?",
                        target.volume,
                        tessel_engine::NAME_RULE
                    ),
                ));
            }
            if !seen.insert(target.volume.as_str()) {
                return Err(Problem::new(
                    at("volume"),
                    format!("volume '{}' already has an [[iscsi.target]]", target.volume),
                ));
            }
            check_chap(&target.chap_user, &target.chap_secret, "chap", &at)?;
            check_chap(&target.mutual_user, &target.mutual_secret, "mutual", &at)?;
            if target.mutual_user.is_some() && target.chap_user.is_none() {
                return Err(Problem::new(
                    at("mutual_user"),
                    "mutual CHAP needs chap_user and chap_secret too",
                ));
            }
            if target.mutual_secret.is_some() && target.mutual_secret == target.chap_secret {
                return Err(Problem::new(
                    at("mutual_secret"),
                    "mutual_secret must differ from chap_secret (RFC 3720)",
                ));
            }
        }
        Ok(())
    }
}

/// Levels, or `target=level` directives, comma separated. Stricter than tracing's own
/// parser, which reads a mistyped level ("inf") as a target name and logs everything.
pub(crate) fn is_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let is_target =
        |t: &str| !t.is_empty() && t.chars().all(|c| c.is_alphanumeric() || "_:-".contains(c));
    filter
        .split(',')
        .all(|directive| match directive.split_once('=') {
            Some((target, level)) => is_target(target) && is_level(level),
            None => is_level(directive),
        })
}

/// A user and a secret come together; secrets are at least 12 characters, the minimum
/// RFC 3720 sets for CHAP without IPsec.
fn check_chap(
    user: &Option<String>,
    secret: &Option<String>,
    prefix: &'static str,
    at: &dyn Fn(&'static str) -> Vec<Seg<'static>>,
) -> Result<(), Problem> {
    let (user_key, secret_key) = match prefix {
        "chap" => ("chap_user", "chap_secret"),
        _ => ("mutual_user", "mutual_secret"),
    };
    match (user, secret) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(Problem::new(
            at(secret_key),
            format!("{user_key} is set but {secret_key} is missing"),
        )),
        (None, Some(_)) => Err(Problem::new(
            at(user_key),
            format!("{secret_key} is set but {user_key} is missing"),
        )),
        (Some(u), Some(_)) if u.is_empty() => {
            Err(Problem::new(at(user_key), "the CHAP user name is empty"))
        }
        (Some(_), Some(s)) if s.len() < 12 => Err(Problem::new(
            at(secret_key),
            "CHAP secrets must be at least 12 characters (RFC 3720)",
        )),
        _ => Ok(()),
    }
}

/// Pool, volume and snapshot names follow the engine's one rule.
fn check_name(name: &str, what: &str, path: Vec<Seg<'static>>) -> Result<(), Problem> {
    if !tessel_engine::valid_name(name) {
        return Err(Problem::new(
            path,
            format!(
                "'{name}' is not a valid {what} name ({})",
                tessel_engine::NAME_RULE
            ),
        ));
    }
    Ok(())
}

/// One step of a key path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// A semantic problem, before it is located in the text.
pub(super) struct Problem {
    pub(super) path: Vec<Seg<'static>>,
    pub(super) message: String,
}

impl Problem {
    fn new(path: Vec<Seg<'static>>, message: impl Into<String>) -> Problem {
        Problem {
            path,
            message: message.into(),
        }
    }
}
