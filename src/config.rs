//! The daemon's TOML configuration: typed structs, loading, and the checks that refuse a
//! broken file before anything starts.
//!
//! Every error names the file, the line and column, the key (`volume[1].pool`) and what was
//! expected, because a daemon that starts with half its configuration ignored is worse than
//! one that does not start. Unknown keys are errors for the same reason.
//!
//! Relative paths (pool devices, the control socket) are relative to `daemon.data_dir`, so
//! that `--data-dir` moves everything a daemon owns in one go.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::size::{self, ByteSize};

mod check;
pub(crate) use check::is_log_filter;
#[cfg(test)]
mod fuzz;
mod keys;
#[cfg(test)]
mod tests;

/// The documented default configuration, used when `tessel serve` gets no `--config`.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/tessel.toml");

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Reactors, polling and logging.
    #[serde(default)]
    pub engine: EngineConfig,
    /// Pools, in file order (`[[pool]]`).
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Volumes that must exist (`[[volume]]`); created at start when missing.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// The NBD target.
    #[serde(default)]
    pub nbd: NbdConfig,
    /// The iSCSI target.
    #[serde(default)]
    pub iscsi: IscsiConfig,
    /// Extra exports beyond each volume's own, e.g. snapshots (`[[export]]`).
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
    /// Periodic snapshots (`[[schedule]]`).
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
    /// Where the daemon keeps its files.
    #[serde(default)]
    pub daemon: DaemonConfig,
    /// What host connections may hold and how long they may wait.
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// `[engine]`: reactors, polling and logging.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Which cores run a reactor.
    pub cores: Cores,
    /// How an idle reactor waits.
    pub poll: PollMode,
    /// io_uring submission queue entries per reactor (a power of two, 1–32768).
    pub ring_entries: u32,
    /// Adaptive polling: microseconds to spin before sleeping.
    pub spin_us: u64,
    /// Device I/Os a reactor queues before it submits them mid-pass (1 = each at once).
    pub submit_batch: u32,
    /// A tracing filter: a level ("info") or directives ("info,tessel_engine=debug").
    pub log_level: String,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cores: Cores::All,
            poll: PollMode::Adaptive,
            ring_entries: 256,
            spin_us: 50,
            submit_batch: 1,
            log_level: "info".to_string(),
        }
    }
}

/// Which cores run a reactor: `"all"`, a count (`2`: cores 0 and 1) or a list (`[2, 3]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cores {
    /// One reactor on every online core.
    All,
    /// Reactors on cores 0..n.
    Count(usize),
    /// Reactors on exactly these core ids.
    List(Vec<usize>),
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CoresVisitor;
        impl<'de> Visitor<'de> for CoresVisitor {
            type Value = Cores;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"all\", a number of cores, or a list of core ids like [0, 1]")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Cores, E> {
                match v {
                    "all" => Ok(Cores::All),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Cores, E> {
                match usize::try_from(v) {
                    Ok(n) if n > 0 => Ok(Cores::Count(n)),
                    _ => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Cores, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<usize>()? {
                    ids.push(id);
                }
                Ok(Cores::List(ids))
            }
        }
        deserializer.deserialize_any(CoresVisitor)
    }
}

/// How an idle reactor waits for work.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Spin for `spin_us`, then sleep in io_uring_enter until woken (the default).
    Adaptive,
    /// Spin forever like SPDK: lowest latency, 100% of each reactor's core.
    Busy,
}

/// `[[pool]]`: backing devices formatted by tessel.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Unique pool name, referenced by volumes.
    pub name: String,
    /// Files or block devices; relative paths are relative to `daemon.data_dir`.
    pub devices: Vec<PathBuf>,
    /// Size of device files that do not exist yet (created sparse).
    #[serde(default)]
    pub create_size: Option<ByteSize>,
    /// Allocation unit: a power of two from 4 KiB to 1 MiB.
    #[serde(default = "default_cluster_size")]
    pub cluster_size: ByteSize,
    /// Whether tessel may format devices that hold no pool yet.
    #[serde(default)]
    pub format: FormatPolicy,
}

fn default_cluster_size() -> ByteSize {
    ByteSize(64 << 10)
}

/// When tessel formats a pool's devices.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FormatPolicy {
    /// Format devices that are empty (all zeros where a signature would be); refuse others.
    #[default]
    IfEmpty,
    /// Never format: the pool must already exist.
    Never,
}

/// `[[volume]]`: a volume that must exist.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Unique volume name: 1-64 characters from A-Z a-z 0-9 . _ -, not starting with '.' or '-'.
    pub name: String,
    /// The pool it lives in.
    pub pool: String,
    /// Virtual size, a multiple of `block_size`.
    pub size: ByteSize,
    /// Exported logical block size: 512 or 4096.
    #[serde(default = "default_block_size")]
    pub block_size: u32,
}

fn default_block_size() -> u32 {
    4096
}

/// `[nbd]`: the NBD target.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    /// TCP address to listen on; `None` (written `""`) disables NBD.
    #[serde(deserialize_with = "listen_address")]
    pub listen: Option<SocketAddr>,
    /// TLS (`[nbd.tls]`); None: NBD_OPT_STARTTLS is refused and every export is plain text.
    pub tls: Option<NbdTlsConfig>,
    /// Refuse clients that negotiate no block size (NBD_OPT_GO without
    /// NBD_INFO_BLOCK_SIZE: NBD_REP_ERR_BLOCK_SIZE_REQD; NBD_OPT_EXPORT_NAME: disconnect)
    /// instead of serving them any byte range with read-modify-write.
    pub require_block_size: bool,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            tls: None,
            require_block_size: false,
        }
    }
}

/// `[nbd.tls]`: the server's X.509 credentials, and who may connect.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NbdTlsConfig {
    /// PEM file with the server certificate (then any intermediates); relative to data_dir.
    pub certificate: PathBuf,
    /// PEM file with the certificate's private key; relative to data_dir.
    pub key: PathBuf,
    /// PEM file with the CA certificates that sign client certificates: set, a client must
    /// present a certificate one of them signed (mutual TLS, the authentication).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// What exports without their own `tls` key need.
    #[serde(default = "tls_required")]
    pub default: TlsMode,
}

fn tls_required() -> TlsMode {
    TlsMode::Require
}

/// Whether an export may be used without TLS (on a daemon with `[nbd.tls]`).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// With or without TLS.
    Optional,
    /// Only over TLS.
    Require,
}

/// `[iscsi]`: the iSCSI target.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    /// TCP address of the portal; `None` (written `""`) disables iSCSI.
    #[serde(deserialize_with = "listen_address")]
    pub listen: Option<SocketAddr>,
    /// Each volume is the target `<iqn_prefix>:<volume>`.
    pub iqn_prefix: String,
    /// Access rules by volume name or pattern (`[[iscsi.target]]`); clones follow their
    /// origin's rule (docs/iscsi.md, "Access rules").
    #[serde(rename = "target")]
    pub targets: Vec<IscsiTargetConfig>,
    /// Volumes no rule covers: open or refused. Unset: refused when the file has any
    /// `[[iscsi.target]]`, open when it has none (see `unmatched_policy`).
    pub unmatched: Option<Unmatched>,
}

impl IscsiConfig {
    /// What happens to volumes no rule covers, with the default applied.
    pub fn unmatched_policy(&self) -> Unmatched {
        self.unmatched.unwrap_or(if self.targets.is_empty() {
            Unmatched::Allow
        } else {
            Unmatched::Deny
        })
    }
}

/// `iscsi.unmatched`: what happens to a volume that no `[[iscsi.target]]` covers.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Any initiator logs in without authentication.
    Allow,
    /// Logins are refused, and discovery does not list the volume.
    Deny,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 3260))),
            iqn_prefix: "iqn.2026-11.dev.tessel".to_string(),
            targets: Vec::new(),
            unmatched: None,
        }
    }
}

/// `[[iscsi.target]]`: who may log in to the targets of the volumes a rule covers.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IscsiTargetConfig {
    /// A volume name, or a pattern (`*` any run of characters, `?` one character); the
    /// volumes need not exist yet.
    pub volume: String,
    /// Initiator IQNs allowed to log in; empty allows any.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    /// CHAP: the name the initiator must present.
    #[serde(default)]
    pub chap_user: Option<String>,
    /// CHAP: the initiator's secret (at least 12 characters).
    #[serde(default)]
    pub chap_secret: Option<String>,
    /// Mutual CHAP: the name the target presents to the initiator.
    #[serde(default)]
    pub mutual_user: Option<String>,
    /// Mutual CHAP: the target's secret (different from `chap_secret`).
    #[serde(default)]
    pub mutual_secret: Option<String>,
}

/// `[[export]]`: an extra export, e.g. a snapshot.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// The volume.
    pub volume: String,
    /// A snapshot of it, exported read-only as `volume@snapshot`.
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Whether NBD clients need TLS for it; None: `nbd.tls.default`. Needs `[nbd.tls]`.
    #[serde(default)]
    pub tls: Option<TlsMode>,
}

impl ExportConfig {
    /// The export name hosts use: `vol` or `vol@snap`.
    pub fn name(&self) -> String {
        match &self.snapshot {
            Some(snap) => format!("{}@{}", self.volume, snap),
            None => self.volume.clone(),
        }
    }
}

/// `[[schedule]]`: take a snapshot of a volume periodically and keep the newest few.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// The volume.
    pub volume: String,
    /// Interval between snapshots: "30s", "15m", "1h", "2d".
    #[serde(deserialize_with = "duration")]
    pub every: Duration,
    /// How many scheduled snapshots to keep; older ones are deleted.
    pub keep: u32,
}

/// `[daemon]`: where the daemon keeps its files.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Directory for pool files, the control socket and the pool lock; created if missing.
    pub data_dir: PathBuf,
    /// Unix socket of the control protocol (docs/control.md), relative to `data_dir`.
    pub control_socket: PathBuf,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            data_dir: PathBuf::from("tessel-data"),
            control_socket: PathBuf::from("tessel.sock"),
        }
    }
}

/// `[limits]`: what host connections (NBD and iSCSI) may hold, and for how long.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Connections each target accepts at once; more are closed at once.
    pub connections: u32,
    /// Connections each target accepts at once from one client IP address.
    pub connections_per_client: u32,
    /// A connection that has not chosen an export or finished its login by then is closed.
    #[serde(deserialize_with = "duration")]
    pub handshake_timeout: Duration,
    /// A connection with nothing in flight that sends nothing this long is closed; 0: never.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Read data and write payloads one connection (NBD) or session (iSCSI) may hold
    /// before its next request waits.
    pub connection_memory: ByteSize,
    /// The same for all connections together.
    pub memory: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connections: 4096,
            connections_per_client: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::ZERO,
            connection_memory: ByteSize(64 << 20),
            memory: ByteSize(2 << 30),
        }
    }
}

fn listen_address<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen(&text).map_err(de::Error::custom)
}

/// Parses a listen address: `""` disables, otherwise `IP:PORT`.
pub fn parse_listen(text: &str) -> Result<Option<SocketAddr>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        format!("invalid address '{text}', expected IP:PORT like \"127.0.0.1:10809\" or \"\" to disable")
    })
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    size::parse_duration(&text).map_err(|e| {
        de::Error::custom(format!(
            "{e}, expected a duration like \"30s\", \"15m\", \"1h\" or \"2d\""
        ))
    })
}

/// Where in the file an error is, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    /// The file, as given (or a description of the embedded default).
    pub file: String,
    /// 1-based line, when the error points at one place.
    pub line: Option<usize>,
    /// 1-based column on that line.
    pub column: Option<usize>,
    /// Dotted key path, like `engine.poll` or `volume[1].pool`.
    pub key: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)
    }
}

/// Why a configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Not valid TOML, or not the schema: unknown key, wrong type, bad value.
    Parse(Invalid),
    /// Well-formed but inconsistent: unknown pool, duplicate name, out-of-range value.
    Check(Invalid),
}

impl ConfigError {
    /// The location and message, for errors about the file's contents.
    pub fn invalid(&self) -> Option<&Invalid> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse(i) | ConfigError::Check(i) => Some(i),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse(i) | ConfigError::Check(i) => write!(f, "{i}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Config {
    /// Reads, parses and checks a configuration file, against this machine too (the
    /// cores it lists must be ones this process may run on).
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = path.display().to_string();
        let config = Config::parse(&text, &file)?;
        config
            .check_host(&usable_cores())
            .map_err(|problem| ConfigError::Check(locate(&text, &file, problem)))?;
        Ok(config)
    }

    /// The embedded default (config/tessel.toml); a unit test keeps it valid.
    pub fn embedded_default() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "(embedded config/tessel.toml)")
            .expect("the embedded default configuration is valid")
    }

    /// Parses and checks configuration text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let span = e.span();
            let (line, column) = span.as_ref().map(|s| line_column(text, s.start)).unzip();
            ConfigError::Parse(Invalid {
                file: file.to_string(),
                line,
                column,
                key: span.and_then(|s| keys::at_offset(text, s.start)),
                message: e.message().trim_end().to_string(),
            })
        })?;
        config
            .check()
            .map_err(|problem| ConfigError::Check(locate(text, file, problem)))?;
        Ok(config)
    }

    /// A path from the file resolved against `data_dir` (absolute paths stay as they are).
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.daemon.data_dir.join(path)
    }

    /// The control socket's path, resolved against `data_dir`.
    pub fn control_socket_path(&self) -> PathBuf {
        self.resolve(&self.daemon.control_socket)
    }
}

/// A semantic problem placed at its key's line in `text`.
fn locate(text: &str, file: &str, problem: check::Problem) -> Invalid {
    let (line, column) = keys::offset_of(text, &problem.path)
        .map(|offset| line_column(text, offset))
        .unzip();
    Invalid {
        file: file.to_string(),
        line,
        column,
        key: Some(keys::render(&problem.path)),
        message: problem.message,
    }
}

/// The CPUs this process may run on (its affinity mask).
fn usable_cores() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data for which all zeros is the empty set;
    // sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: as above; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut set) } != 0 {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..n).collect();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
