//! The command line: `tessel serve` and the admin subcommands that talk to it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{self, Config, ConfigError};
use crate::size;

/// Where the admin commands look for the daemon when neither --socket nor TESSEL_SOCKET says.
pub const DEFAULT_SOCKET: &str = "tessel-data/tessel.sock";

/// tessel: thin volumes, snapshots and clones over io_uring, exported by NBD and iSCSI.
#[derive(Debug, Parser)]
#[command(name = "tessel", version, propagate_version = true)]
pub struct Cli {
    /// Control socket of the running daemon (admin commands). Falls back to $TESSEL_SOCKET,
    /// then to tessel-data/tessel.sock in the current directory.
    #[arg(long, global = true, env = "TESSEL_SOCKET", default_value = DEFAULT_SOCKET, value_name = "PATH")]
    pub socket: PathBuf,

    /// Print the daemon's answer as JSON (for scripts) instead of human-readable tables.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: open the pools, create the configured volumes, serve NBD, iSCSI and
    /// the control socket until SIGTERM or SIGINT.
    Serve(ServeArgs),
    /// Create, delete, resize, list, inspect and roll back volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take, delete and list snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Make writable clones of snapshots, and make clones independent.
    #[command(subcommand)]
    Clone(CloneCommand),
    /// Choose what NBD and iSCSI hosts can see.
    #[command(subcommand)]
    Export(ExportCommand),
    /// Per-core IOPS, bandwidth, latency and queue depth; pool space; fill/inflate progress.
    Stats,
    /// Periodic snapshots.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Who is connected: list and close NBD connections and iSCSI sessions.
    #[command(subcommand)]
    Session(SessionCommand),
    /// Offline pool maintenance (the daemon must be stopped).
    #[command(subcommand)]
    Pool(PoolCommand),
}

/// `tessel pool`: runs on the pool's devices directly, not through the daemon.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Open a pool whose journal or control log is damaged (the daemon refuses to start on
    /// it), replay up to the damage, report exactly what is dropped, and checkpoint, so
    /// that the pool opens normally afterwards.
    Salvage(PoolArgs),
}

/// Which pool an offline command works on: the one the daemon would open.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// Configuration file (TOML), as for `tessel serve`; without it, the embedded default.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory for pool files (overrides daemon.data_dir), as for `tessel serve`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl PoolArgs {
    /// The configuration naming the pool.
    pub fn config(&self) -> Result<Config, ConfigError> {
        load_config(self.config.as_deref(), self.data_dir.as_deref())
    }
}

/// The configuration file (or the embedded default) with `--data-dir` applied.
fn load_config(
    file: Option<&std::path::Path>,
    data_dir: Option<&std::path::Path>,
) -> Result<Config, ConfigError> {
    let mut config = match file {
        Some(path) => Config::load(path)?,
        None => Config::embedded_default(),
    };
    if let Some(dir) = data_dir {
        config.daemon.data_dir = dir.to_path_buf();
    }
    Ok(config)
}

/// `tessel serve` flags; they override the configuration file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML). Without it, the embedded default (config/tessel.toml) runs:
    /// a sparse file pool in ./tessel-data with one 4 GiB volume `vol0`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory for pool files, the control socket and the pool lock (overrides
    /// daemon.data_dir). Relative device paths in the file are relative to it.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address the NBD target listens on, IP:PORT; "" disables NBD (overrides nbd.listen).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub nbd_listen: Option<Listen>,

    /// Address of the iSCSI portal, IP:PORT; "" disables iSCSI (overrides iscsi.listen).
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub iscsi_listen: Option<Listen>,

    /// Path of the control socket the admin commands connect to (overrides
    /// daemon.control_socket; relative to the current directory).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Log line format: "text" for people, "json" (one object per line) for log collectors.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, value_name = "FORMAT")]
    pub log_format: LogFormat,

    /// Log filter: error, warn, info, debug, trace, or directives like
    /// "info,tessel_engine=debug" (overrides engine.log_level).
    #[arg(long, value_name = "LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,
}

impl ServeArgs {
    /// The configuration to run: the file (or the embedded default) with the flags applied.
    pub fn config(&self) -> Result<Config, ConfigError> {
        let mut config = load_config(self.config.as_deref(), self.data_dir.as_deref())?;
        if let Some(listen) = self.nbd_listen {
            config.nbd.listen = listen.0;
        }
        if let Some(listen) = self.iscsi_listen {
            config.iscsi.listen = listen.0;
        }
        if let Some(socket) = &self.control_socket {
            // Relative to the current directory, as paths on a command line are; made
            // absolute so that resolving against data_dir leaves it alone.
            config.daemon.control_socket =
                std::path::absolute(socket).unwrap_or_else(|_| socket.clone());
        }
        if let Some(level) = &self.log_level {
            config.engine.log_level = level.clone();
        }
        Ok(config)
    }
}

/// A listen address from the command line; `None` disables the listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

fn parse_listen(text: &str) -> Result<Listen, String> {
    config::parse_listen(text).map(Listen)
}

fn parse_log_level(text: &str) -> Result<String, String> {
    if config::is_log_filter(text) {
        Ok(text.to_string())
    } else {
        Err("expected error, warn, info, debug, trace or directives like \"info,tessel_engine=debug\"".into())
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `tessel volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume; no space is used until it is written.
    Create {
        /// Volume name: also its NBD export name and the end of its iSCSI IQN.
        name: String,
        /// Virtual size: 4G, 1.5G, 512MiB, 1T, or bytes (binary units; 4GB = 4 GiB).
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Logical block size hosts see: 512 (old guests) or 4096.
        #[arg(long, default_value = "4096", value_parser = parse_block_size)]
        block_size: u32,
    },
    /// Delete a volume and free its space (delete its snapshots first). Refused while hosts
    /// are connected to it.
    Delete {
        /// Volume name.
        name: String,
        /// Delete it even while hosts are connected: their connections are closed.
        #[arg(long)]
        force: bool,
    },
    /// Grow a volume to a new size; hosts see it at their next capacity check.
    Resize {
        /// Volume name.
        name: String,
        /// New virtual size: 4G, 512MiB, 1T, or bytes.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// List volumes with their size and allocated space.
    List,
    /// Show one volume: size, block size, allocated space, origin, snapshots.
    Info {
        /// Volume name.
        name: String,
    },
    /// Make a volume's contents those of one of its snapshots again.
    Rollback {
        /// Volume name.
        volume: String,
        /// Snapshot of that volume to return to.
        snapshot: String,
        /// Roll back even while hosts are connected (they would see the data change under them).
        /// Snapshots newer than SNAPSHOT are kept either way.
        #[arg(long)]
        force: bool,
    },
}

/// `tessel snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a crash-consistent snapshot of a volume (instant: no data is copied).
    Create {
        /// Volume name.
        volume: String,
        /// Snapshot name, unique per volume; exported read-only as VOLUME@NAME.
        name: String,
    },
    /// Delete a snapshot and free the space only it used. Refused while the snapshot is
    /// protected, or while hosts are connected to it.
    Delete {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
        /// Delete it even while hosts are connected: their connections are closed.
        #[arg(long)]
        force: bool,
    },
    /// Protect a snapshot: nothing deletes it (by hand or a schedule's expiry) until it is
    /// unprotected.
    Protect {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// Lift a snapshot's protection.
    Unprotect {
        /// Volume name.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// List snapshots of one volume, or of every volume.
    List {
        /// Only this volume's snapshots.
        volume: Option<String>,
    },
}

/// `tessel clone ...`
#[derive(Debug, Subcommand)]
pub enum CloneCommand {
    /// Create a writable volume that starts as a snapshot's image (instant, shares space).
    Create {
        /// The snapshot to clone, written VOLUME@SNAPSHOT.
        #[arg(value_parser = parse_snapshot_ref, value_name = "VOLUME@SNAPSHOT")]
        source: SnapshotRef,
        /// Name of the new volume.
        new_volume: String,
    },
    /// Copy what a clone still shares with its origin, so the origin snapshot can be deleted.
    /// Runs in the background; follow it with `tessel stats`.
    Inflate {
        /// The clone.
        volume: String,
        /// Wait until the copy is done before returning.
        #[arg(long)]
        wait: bool,
    },
}

/// `tessel export ...`
#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Export a volume (NAME, read-write) or a snapshot (VOLUME@SNAPSHOT, read-only) over
    /// NBD and iSCSI.
    Add {
        /// VOLUME or VOLUME@SNAPSHOT.
        name: String,
    },
    /// Stop exporting; connected hosts are disconnected.
    Remove {
        /// VOLUME or VOLUME@SNAPSHOT.
        name: String,
    },
    /// List exports and their open connections.
    List,
}

/// `tessel schedule ...`
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Snapshot a volume periodically, keeping the newest scheduled snapshots.
    Set {
        /// Volume name.
        volume: String,
        /// Interval: 30s, 15m, 1h, 2d.
        #[arg(long, value_parser = parse_every, value_name = "DURATION")]
        every: u64,
        /// How many scheduled snapshots to keep (older ones are deleted); 0 removes the
        /// schedule.
        #[arg(long, value_name = "N")]
        keep: u32,
    },
    /// Stop snapshotting a volume; the snapshots the schedule took stay.
    Remove {
        /// Volume name.
        volume: String,
    },
    /// List schedules and when each next runs.
    List,
}

/// `tessel session ...`
#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Open NBD connections and iSCSI sessions: peer, export or initiator and target,
    /// since when, requests in flight, bytes read and written.
    List,
    /// Disconnect one host connection.
    Close {
        /// Its ID, from `tessel session list`.
        id: u64,
    },
}

/// A snapshot named on the command line as `VOLUME@SNAPSHOT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRef {
    pub volume: String,
    pub snapshot: String,
}

impl fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.volume, self.snapshot)
    }
}

fn parse_snapshot_ref(text: &str) -> Result<SnapshotRef, String> {
    match text.split_once('@') {
        Some((volume, snapshot))
            if !volume.is_empty() && !snapshot.is_empty() && !snapshot.contains('@') =>
        {
            Ok(SnapshotRef {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })
        }
        _ => Err(format!(
            "'{text}' is not VOLUME@SNAPSHOT: name the snapshot to clone, e.g. vol0@nightly"
        )),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    match size::parse_size(text) {
        Ok(0) => Err("a size must be more than 0".into()),
        Ok(bytes) => Ok(bytes),
        Err(e) => Err(format!(
            "{e}; expected a size like 4G, 512MiB, 1T or a number of bytes"
        )),
    }
}

fn parse_block_size(text: &str) -> Result<u32, String> {
    match text {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err("expected 512 or 4096".into()),
    }
}

fn parse_every(text: &str) -> Result<u64, String> {
    match size::parse_duration(text) {
        Ok(d) if d.as_secs() > 0 => Ok(d.as_secs()),
        Ok(_) => Err("the interval must be at least 1s".into()),
        Err(e) => Err(format!("{e}; expected a duration like 30s, 15m, 1h or 2d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tessel").chain(args.iter().copied()))
    }

    #[test]
    fn command_definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn volume_create_takes_human_sizes_and_a_block_size() {
        let cli = parse(&["volume", "create", "v", "4G"]).unwrap();
        match cli.command {
            Command::Volume(VolumeCommand::Create {
                name,
                size,
                block_size,
            }) => {
                assert_eq!((name.as_str(), size, block_size), ("v", 4 << 30, 4096));
            }
            other => panic!("{other:?}"),
        }
        let cli = parse(&["volume", "create", "v", "512MiB", "--block-size", "512"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Create { size, block_size: 512, .. }) if size == 512 << 20
        ));
        let cli = parse(&["volume", "resize", "v", "1T"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Resize { size, .. }) if size == 1 << 40
        ));
    }

    #[test]
    fn bad_sizes_and_block_sizes_are_refused_with_the_reason() {
        let err = parse(&["volume", "create", "v", "4Q"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown unit 'Q'") && err.contains("4G, 512MiB"),
            "{err}"
        );
        let err = parse(&["volume", "create", "v", "0"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 0"), "{err}");
        let err = parse(&["volume", "create", "v", "1G", "--block-size", "1024"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected 512 or 4096"), "{err}");
    }

    #[test]
    fn clone_create_splits_volume_at_snapshot() {
        let cli = parse(&["clone", "create", "vol0@nightly", "vol1"]).unwrap();
        match cli.command {
            Command::Clone(CloneCommand::Create { source, new_volume }) => {
                assert_eq!(source.volume, "vol0");
                assert_eq!(source.snapshot, "nightly");
                assert_eq!(source.to_string(), "vol0@nightly");
                assert_eq!(new_volume, "vol1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn clone_create_without_at_explains_the_expected_form() {
        for bad in ["vol0", "@nightly", "vol0@", "a@b@c"] {
            let err = parse(&["clone", "create", bad, "vol1"])
                .unwrap_err()
                .to_string();
            assert!(err.contains("is not VOLUME@SNAPSHOT"), "{bad}: {err}");
        }
    }

    #[test]
    fn schedule_set_reads_durations() {
        let cli = parse(&["schedule", "set", "v", "--every", "1h", "--keep", "24"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Schedule(ScheduleCommand::Set {
                every: 3600,
                keep: 24,
                ..
            })
        ));
        assert!(parse(&["schedule", "set", "v", "--every", "1w", "--keep", "2"]).is_err());
        assert!(parse(&["schedule", "set", "v", "--every", "1h"]).is_err());
    }

    #[test]
    fn optional_arguments_and_flags_parse() {
        let cli = parse(&["snapshot", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Snapshot(SnapshotCommand::List { volume: None })
        ));
        let cli = parse(&["volume", "rollback", "v", "s", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Rollback { force: true, .. })
        ));
        let cli = parse(&["clone", "inflate", "c", "--wait"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Clone(CloneCommand::Inflate { wait: true, .. })
        ));
    }

    #[test]
    fn socket_flag_wins_over_the_default_and_json_is_global() {
        // TESSEL_SOCKET is read by clap at parse time; the tests leave it unset.
        if std::env::var_os("TESSEL_SOCKET").is_none() {
            let cli = parse(&["stats"]).unwrap();
            assert_eq!(cli.socket, PathBuf::from(DEFAULT_SOCKET));
        }
        let cli = parse(&["volume", "list", "--socket", "/run/t.sock", "--json"]).unwrap();
        assert_eq!(cli.socket, PathBuf::from("/run/t.sock"));
        assert!(cli.json);
    }

    #[test]
    fn serve_flags_override_the_embedded_default() {
        let cli = parse(&[
            "serve",
            "--data-dir",
            "/tmp/t",
            "--nbd-listen",
            "127.0.0.1:20809",
            "--iscsi-listen",
            "",
            "--log-format",
            "json",
            "--log-level",
            "debug",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        assert_eq!(args.log_format, LogFormat::Json);
        let config = args.config().unwrap();
        assert_eq!(config.daemon.data_dir, PathBuf::from("/tmp/t"));
        assert_eq!(
            config.control_socket_path(),
            PathBuf::from("/tmp/t/tessel.sock")
        );
        assert_eq!(config.nbd.listen, Some("127.0.0.1:20809".parse().unwrap()));
        assert_eq!(config.iscsi.listen, None);
        assert_eq!(config.engine.log_level, "debug");
        assert!(parse(&["serve", "--nbd-listen", "localhost"]).is_err());
        assert!(parse(&["serve", "--log-format", "xml"]).is_err());
    }
}
