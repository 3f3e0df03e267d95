//! The admin subcommands: turn a command into a control request, send it to the daemon, and
//! print the answer as a table (or as JSON with `--json`).

use std::fmt;

use serde_json::Value;
use tessel_targets::control::proto::{
    ExportInfo, ExportList, JobKind, JobProgress, ResponseError, ScheduleInfo, ScheduleList,
    SessionInfo, SessionList, SnapshotInfo, SnapshotList, Stats, VolumeInfo, VolumeList,
};
use tessel_targets::control::{ClientError, ControlClient, ControlRequest, ControlResponse};

use crate::cli::{
    CloneCommand, Command, ExportCommand, PoolArgs, PoolCommand, ScheduleCommand, SessionCommand,
    SnapshotCommand, VolumeCommand,
};
use tessel_engine::pool::Ring;
use tessel_engine::DeviceSpec;

use crate::size::{format_duration, format_remaining, format_size};
use crate::table::{self, fields, Align, Table};

/// Why an admin command failed; printed as one line after "tessel: ".
#[derive(Debug)]
pub enum AdminError {
    /// No answer from the daemon.
    Client(ClientError),
    /// The daemon answered with an error.
    Daemon(ResponseError),
}

impl fmt::Display for AdminError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdminError::Client(e @ ClientError::Connect { .. }) => {
                write!(f, "{e} — is `tessel serve` running?")
            }
            AdminError::Client(e) => write!(f, "{e}"),
            AdminError::Daemon(e) => write!(f, "{}", e.message),
        }
    }
}

impl std::error::Error for AdminError {}

/// Runs one admin command against the daemon at `socket` and prints its answer.
pub fn run(command: &Command, socket: &std::path::Path, json: bool) -> Result<(), AdminError> {
    let request = request(command);
    let mut client = ControlClient::connect(socket).map_err(AdminError::Client)?;
    let response = client.call(&request).map_err(AdminError::Client)?;
    let data = match response {
        ControlResponse::Ok { data } => data,
        ControlResponse::Error { code, message } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "code": code, "message": message })
                );
            }
            return Err(AdminError::Daemon(ResponseError { code, message }));
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&data).expect("JSON values serialize")
        );
    } else {
        print!("{}", render(command, data).map_err(AdminError::Daemon)?);
    }
    Ok(())
}

/// The control request for a command. `serve` is not an admin command.
pub fn request(command: &Command) -> ControlRequest {
    let s = |v: &String| v.clone();
    match command {
        Command::Serve(_) | Command::Pool(_) => {
            unreachable!("serve and pool commands are not sent to a daemon")
        }
        Command::Volume(v) => match v {
            VolumeCommand::Create {
                name,
                size,
                block_size,
            } => ControlRequest::VolumeCreate {
                name: s(name),
                size: *size,
                block_size: *block_size,
            },
            VolumeCommand::Delete { name, force } => ControlRequest::VolumeDelete {
                name: s(name),
                force: *force,
            },
            VolumeCommand::Resize { name, size } => ControlRequest::VolumeResize {
                name: s(name),
                size: *size,
            },
            VolumeCommand::List => ControlRequest::VolumeList,
            VolumeCommand::Info { name } => ControlRequest::VolumeInfo { name: s(name) },
            VolumeCommand::Rollback {
                volume,
                snapshot,
                force,
            } => ControlRequest::VolumeRollback {
                volume: s(volume),
                snapshot: s(snapshot),
                force: *force,
            },
        },
        Command::Snapshot(c) => match c {
            SnapshotCommand::Create { volume, name } => ControlRequest::SnapshotCreate {
                volume: s(volume),
                name: s(name),
            },
            SnapshotCommand::Delete {
                volume,
                name,
                force,
            } => ControlRequest::SnapshotDelete {
                volume: s(volume),
                name: s(name),
                force: *force,
            },
            SnapshotCommand::Protect { volume, name } => ControlRequest::SnapshotProtect {
                volume: s(volume),
                name: s(name),
            },
            SnapshotCommand::Unprotect { volume, name } => ControlRequest::SnapshotUnprotect {
                volume: s(volume),
                name: s(name),
            },
            SnapshotCommand::List { volume } => ControlRequest::SnapshotList {
                volume: volume.clone(),
            },
        },
        Command::Clone(c) => match c {
            CloneCommand::Create { source, new_volume } => ControlRequest::CloneCreate {
                volume: source.volume.clone(),
                snapshot: source.snapshot.clone(),
                new_volume: s(new_volume),
            },
            CloneCommand::Inflate { volume, wait } => ControlRequest::CloneInflate {
                volume: s(volume),
                wait: *wait,
            },
        },
        Command::Export(c) => match c {
            ExportCommand::Add { name } => ControlRequest::ExportAdd { name: s(name) },
            ExportCommand::Remove { name } => ControlRequest::ExportRemove { name: s(name) },
            ExportCommand::List => ControlRequest::ExportList,
        },
        Command::Stats => ControlRequest::Stats,
        Command::Schedule(c) => match c {
            ScheduleCommand::Set {
                volume,
                every,
                keep,
            } => ControlRequest::ScheduleSet {
                volume: s(volume),
                every_secs: *every,
                keep: *keep,
            },
            ScheduleCommand::Remove { volume } => {
                ControlRequest::ScheduleRemove { volume: s(volume) }
            }
            ScheduleCommand::List => ControlRequest::ScheduleList,
        },
        Command::Session(c) => match c {
            SessionCommand::List => ControlRequest::SessionList,
            SessionCommand::Close { id } => ControlRequest::SessionClose { id: *id },
        },
    }
}

/// The human-readable answer to a command, from the response data.
pub fn render(command: &Command, data: Value) -> Result<String, ResponseError> {
    let ok = || ControlResponse::Ok { data: data.clone() };
    Ok(match command {
        Command::Serve(_) | Command::Pool(_) => {
            unreachable!("serve and pool commands are not sent to a daemon")
        }
        Command::Volume(v) => match v {
            VolumeCommand::Create { name, .. } => {
                let info: VolumeInfo = ok().into_data()?;
                format!(
                    "created volume '{name}': {}, {}-byte blocks\n",
                    format_size(info.size),
                    info.block_size
                )
            }
            VolumeCommand::Delete { name, .. } => format!("deleted volume '{name}'\n"),
            VolumeCommand::Resize { name, .. } => {
                let info: VolumeInfo = ok().into_data()?;
                format!("resized volume '{name}' to {}\n", format_size(info.size))
            }
            VolumeCommand::List => volume_table(&ok().into_data::<VolumeList>()?.volumes),
            VolumeCommand::Info { .. } => volume_fields(&ok().into_data()?),
            VolumeCommand::Rollback {
                volume, snapshot, ..
            } => {
                format!("rolled back volume '{volume}' to snapshot '{snapshot}'\n")
            }
        },
        Command::Snapshot(c) => match c {
            SnapshotCommand::Create { volume, name } => {
                let info: SnapshotInfo = ok().into_data()?;
                format!(
                    "created snapshot '{volume}@{name}' (epoch {})\n",
                    info.epoch
                )
            }
            SnapshotCommand::Delete { volume, name, .. } => {
                format!("deleted snapshot '{volume}@{name}'\n")
            }
            SnapshotCommand::Protect { volume, name } => {
                ok().into_data::<SnapshotInfo>()?;
                format!("protected snapshot '{volume}@{name}'\n")
            }
            SnapshotCommand::Unprotect { volume, name } => {
                ok().into_data::<SnapshotInfo>()?;
                format!("unprotected snapshot '{volume}@{name}'\n")
            }
            SnapshotCommand::List { .. } => {
                snapshot_table(&ok().into_data::<SnapshotList>()?.snapshots)
            }
        },
        Command::Clone(c) => match c {
            CloneCommand::Create { source, new_volume } => {
                ok().into_data::<VolumeInfo>()?;
                format!("created clone '{new_volume}' of '{source}'\n")
            }
            CloneCommand::Inflate { volume, .. } => inflate_line(volume, &ok().into_data()?),
        },
        Command::Export(c) => match c {
            ExportCommand::Add { .. } => {
                let e: ExportInfo = ok().into_data()?;
                let mode = if e.read_only {
                    "read-only"
                } else {
                    "read-write"
                };
                format!("exporting '{}' ({mode}, {})\n", e.name, format_size(e.size))
            }
            ExportCommand::Remove { name } => format!("stopped exporting '{name}'\n"),
            ExportCommand::List => export_table(&ok().into_data::<ExportList>()?.exports),
        },
        Command::Stats => stats_text(&ok().into_data()?),
        Command::Schedule(c) => match c {
            ScheduleCommand::Set {
                volume, keep: 0, ..
            } => format!("removed the schedule of '{volume}'\n"),
            ScheduleCommand::Set { .. } => {
                let s: ScheduleInfo = ok().into_data()?;
                format!(
                    "snapshotting '{}' every {}, keeping {}\n",
                    s.volume,
                    format_duration(s.every_secs),
                    s.keep
                )
            }
            ScheduleCommand::Remove { volume } => format!("removed the schedule of '{volume}'\n"),
            ScheduleCommand::List => schedule_table(&ok().into_data::<ScheduleList>()?.schedules),
        },
        Command::Session(c) => match c {
            SessionCommand::List => session_table(&ok().into_data::<SessionList>()?.sessions),
            SessionCommand::Close { id } => format!("closed session {id}\n"),
        },
    })
}

fn session_table(sessions: &[SessionInfo]) -> String {
    let mut t = Table::new(&[
        ("ID", Align::Right),
        ("PROTOCOL", Align::Left),
        ("PEER", Align::Left),
        ("EXPORT/TARGET", Align::Left),
        ("INITIATOR", Align::Left),
        ("SINCE", Align::Left),
        ("IN FLIGHT", Align::Right),
        ("READ", Align::Right),
        ("WRITTEN", Align::Right),
    ]);
    for s in sessions {
        let dash = || "-".to_string();
        t.row(vec![
            s.id.to_string(),
            s.protocol.clone(),
            s.peer.clone(),
            s.export
                .clone()
                .or_else(|| s.target.clone())
                .unwrap_or_else(dash),
            s.initiator.clone().unwrap_or_else(dash),
            table::format_unix(s.since_unix),
            s.in_flight.to_string(),
            format_size(s.read_bytes),
            format_size(s.written_bytes),
        ]);
    }
    t.render()
}

fn volume_table(volumes: &[VolumeInfo]) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("BLOCK", Align::Right),
        ("ALLOCATED", Align::Right),
        ("SNAPSHOTS", Align::Right),
        ("ORIGIN", Align::Left),
    ]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            format_size(v.size),
            v.block_size.to_string(),
            format_size(v.allocated_bytes),
            v.snapshots.len().to_string(),
            v.origin.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

fn volume_fields(v: &VolumeInfo) -> String {
    fields(&[
        ("name", v.name.clone()),
        (
            "size",
            format!("{} ({} bytes)", format_size(v.size), v.size),
        ),
        ("block size", v.block_size.to_string()),
        ("allocated", format_size(v.allocated_bytes)),
        ("origin", v.origin.clone().unwrap_or_else(|| "-".into())),
        (
            "snapshots",
            if v.snapshots.is_empty() {
                "-".into()
            } else {
                v.snapshots.join(", ")
            },
        ),
    ])
}

fn snapshot_table(snapshots: &[SnapshotInfo]) -> String {
    let mut t = Table::new(&[
        ("VOLUME", Align::Left),
        ("NAME", Align::Left),
        ("CREATED", Align::Left),
        ("EPOCH", Align::Right),
        ("ALLOCATED", Align::Right),
        ("EXCLUSIVE", Align::Right),
        ("SHARED", Align::Right),
        ("FLAGS", Align::Left),
    ]);
    for s in snapshots {
        let mut flags: Vec<&str> = Vec::new();
        if s.scheduled {
            flags.push("scheduled");
        }
        if s.protected {
            flags.push("protected");
        }
        t.row(vec![
            s.volume.clone(),
            s.name.clone(),
            table::format_unix(s.created_unix),
            s.epoch.to_string(),
            format_size(s.allocated_bytes),
            format_size(s.exclusive_bytes),
            format_size(s.shared_bytes),
            if flags.is_empty() {
                "-".into()
            } else {
                flags.join(",")
            },
        ]);
    }
    t.render()
}

fn export_table(exports: &[ExportInfo]) -> String {
    let mut t = Table::new(&[
        ("NAME", Align::Left),
        ("SIZE", Align::Right),
        ("BLOCK", Align::Right),
        ("MODE", Align::Left),
        ("CONNECTIONS", Align::Right),
    ]);
    for e in exports {
        t.row(vec![
            e.name.clone(),
            format_size(e.size),
            e.block_size.to_string(),
            if e.read_only { "ro" } else { "rw" }.into(),
            e.connections.to_string(),
        ]);
    }
    t.render()
}

fn schedule_table(schedules: &[ScheduleInfo]) -> String {
    let now = table::now_unix();
    let mut t = Table::new(&[
        ("VOLUME", Align::Left),
        ("EVERY", Align::Right),
        ("KEEP", Align::Right),
        ("NEXT", Align::Left),
    ]);
    for s in schedules {
        let next = match s.next_unix {
            Some(at) => format!(
                "{} (in {})",
                table::format_unix(at),
                format_remaining(at.saturating_sub(now))
            ),
            None => "-".into(),
        };
        t.row(vec![
            s.volume.clone(),
            format_duration(s.every_secs),
            s.keep.to_string(),
            next,
        ]);
    }
    t.render()
}

fn percent(done: u64, total: u64) -> u64 {
    (done.saturating_mul(100)).checked_div(total).unwrap_or(100)
}

fn inflate_line(volume: &str, job: &JobProgress) -> String {
    if job.finished {
        format!("clone '{volume}' is independent of its origin\n")
    } else {
        format!(
            "inflating '{volume}': {} of {} copied ({}%); follow with `tessel stats`\n",
            format_size(job.done_bytes),
            format_size(job.total_bytes),
            percent(job.done_bytes, job.total_bytes)
        )
    }
}

fn stats_text(stats: &Stats) -> String {
    let mut t = Table::new(&[
        ("CORE", Align::Right),
        ("READ IOPS", Align::Right),
        ("WRITE IOPS", Align::Right),
        ("READ MiB/s", Align::Right),
        ("WRITE MiB/s", Align::Right),
        ("P50 us", Align::Right),
        ("P99 us", Align::Right),
        ("QD", Align::Right),
    ]);
    for c in &stats.cores {
        t.row(vec![
            c.core.to_string(),
            format!("{:.0}", c.read_iops),
            format!("{:.0}", c.write_iops),
            format!("{:.1}", c.read_mib_s),
            format!("{:.1}", c.write_mib_s),
            format!("{:.0}", c.lat_us_p50),
            format!("{:.0}", c.lat_us_p99),
            c.queue_depth.to_string(),
        ]);
    }
    let p = &stats.pool;
    let mut out = t.render();
    out.push_str(&format!(
        "\npool: {} total, {} used ({}%), {} free\n",
        format_size(p.total_bytes),
        format_size(p.used_bytes),
        percent(p.used_bytes, p.total_bytes),
        format_size(p.free_bytes)
    ));
    if !stats.jobs.is_empty() {
        let mut jobs = Table::new(&[
            ("JOB", Align::Left),
            ("VOLUME", Align::Left),
            ("DONE", Align::Right),
            ("TOTAL", Align::Right),
            ("PROGRESS", Align::Right),
        ]);
        for j in &stats.jobs {
            jobs.row(vec![
                match j.kind {
                    JobKind::Fill => "fill",
                    JobKind::Inflate => "inflate",
                }
                .into(),
                j.volume.clone(),
                format_size(j.done_bytes),
                format_size(j.total_bytes),
                format!("{}%", percent(j.done_bytes, j.total_bytes)),
            ]);
        }
        out.push('\n');
        out.push_str(&jobs.render());
    }
    out
}

/// Runs an offline `tessel pool` command on the configured pool's devices.
pub fn pool(command: &PoolCommand, json: bool) -> Result<(), Box<dyn std::error::Error>> {
    let PoolCommand::Salvage(args) = command;
    let report = salvage(args)?;
    if json {
        let dropped: Vec<Value> = report
            .damage
            .iter()
            .map(|d| {
                let (ring, region) = match d.ring {
                    Ring::ControlLog => ("control", None),
                    Ring::Journal(r) => ("journal", Some(r)),
                };
                serde_json::json!({
                    "ring": ring,
                    "region": region,
                    "seq": d.seq,
                    "offset": d.offset,
                    "blocks": d.blocks_after,
                    "records": d.records_after,
                    "last_seq": d.last_seq,
                })
            })
            .collect();
        let out = serde_json::json!({ "images": report.images, "dropped": dropped });
        println!("{out:#}");
        return Ok(());
    }
    if report.damage.is_empty() {
        println!("no damage found; checkpoint written");
    }
    for d in &report.damage {
        println!(
            "{} block {} (byte offset {}) was damaged: dropped {} later blocks (sequences up to {}), {} records",
            d.ring, d.seq, d.offset, d.blocks_after, d.last_seq, d.records_after
        );
    }
    println!(
        "pool salvaged: {} volumes and snapshots kept; it opens normally now",
        report.images
    );
    Ok(())
}

fn salvage(args: &PoolArgs) -> Result<tessel_engine::pool::Salvage, Box<dyn std::error::Error>> {
    let config = args.config()?;
    let pool = match config.pools.as_slice() {
        [p] => p,
        [] => return Err("the configuration declares no [[pool]]".into()),
        _ => return Err("the configuration declares more than one [[pool]]".into()),
    };
    let devices: Vec<DeviceSpec> = pool
        .devices
        .iter()
        .map(|d| DeviceSpec::path(config.resolve(d)))
        .collect();
    Ok(tessel_engine::pool::salvage(&devices)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;
    use serde_json::json;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;
    use tessel_targets::control::proto::{self, CoreStats, PoolSpace};

    fn command(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("tessel").chain(args.iter().copied()))
            .unwrap()
            .command
    }

    fn volume(name: &str, size: u64, origin: Option<&str>, snapshots: &[&str]) -> VolumeInfo {
        VolumeInfo {
            name: name.into(),
            size,
            block_size: 4096,
            allocated_bytes: size / 4,
            origin: origin.map(Into::into),
            snapshots: snapshots.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn commands_become_the_documented_requests() {
        assert_eq!(
            request(&command(&["clone", "create", "vol0@nightly", "vol1"])),
            ControlRequest::CloneCreate {
                volume: "vol0".into(),
                snapshot: "nightly".into(),
                new_volume: "vol1".into()
            }
        );
        assert_eq!(
            request(&command(&[
                "volume",
                "create",
                "v",
                "4G",
                "--block-size",
                "512"
            ])),
            ControlRequest::VolumeCreate {
                name: "v".into(),
                size: 4 << 30,
                block_size: 512
            }
        );
        assert_eq!(
            request(&command(&[
                "schedule", "set", "v", "--every", "15m", "--keep", "4"
            ])),
            ControlRequest::ScheduleSet {
                volume: "v".into(),
                every_secs: 900,
                keep: 4
            }
        );
        assert_eq!(
            request(&command(&["snapshot", "list", "v"])),
            ControlRequest::SnapshotList {
                volume: Some("v".into())
            }
        );
    }

    #[test]
    fn volume_list_renders_an_aligned_table() {
        let data = serde_json::to_value(VolumeList {
            volumes: vec![
                volume("vol0", 4 << 30, None, &["a", "b"]),
                volume("clone-of-vol0", 512 << 20, Some("vol0@a"), &[]),
            ],
        })
        .unwrap();
        assert_eq!(
            render(&command(&["volume", "list"]), data).unwrap(),
            "NAME                SIZE  BLOCK  ALLOCATED  SNAPSHOTS  ORIGIN\n\
             vol0             4.0 GiB   4096    1.0 GiB          2  -\n\
             clone-of-vol0  512.0 MiB   4096  128.0 MiB          0  vol0@a\n"
        );
    }

    #[test]
    fn volume_info_renders_fields() {
        let data = serde_json::to_value(volume("vol0", 4 << 30, None, &["a", "b"])).unwrap();
        assert_eq!(
            render(&command(&["volume", "info", "vol0"]), data).unwrap(),
            "name:       vol0\n\
             size:       4.0 GiB (4294967296 bytes)\n\
             block size: 4096\n\
             allocated:  1.0 GiB\n\
             origin:     -\n\
             snapshots:  a, b\n"
        );
    }

    #[test]
    fn snapshot_list_shows_times_space_and_flags() {
        let data = json!({"snapshots": [{
            "volume": "vol0", "name": "nightly", "created_unix": 1_795_313_045u64, "epoch": 7,
            "allocated_bytes": 1u64 << 30, "exclusive_bytes": 65536, "shared_bytes": 512u64 << 20
        }, {
            "volume": "vol0", "name": "auto-x", "created_unix": 1_795_313_045u64, "epoch": 8,
            "allocated_bytes": 0, "exclusive_bytes": 0, "shared_bytes": 0,
            "scheduled": true, "protected": true
        }]});
        assert_eq!(
            render(&command(&["snapshot", "list"]), data).unwrap(),
            "VOLUME  NAME     CREATED               EPOCH  ALLOCATED  EXCLUSIVE     SHARED  FLAGS\n\
             vol0    nightly  2026-11-22 02:04:05Z      7    1.0 GiB   64.0 KiB  512.0 MiB  -\n\
             vol0    auto-x   2026-11-22 02:04:05Z      8        0 B        0 B        0 B  scheduled,protected\n"
        );
    }

    #[test]
    fn stats_show_cores_pool_and_jobs() {
        let stats = Stats {
            cores: vec![CoreStats {
                core: 0,
                read_iops: 51234.4,
                write_iops: 10.0,
                read_mib_s: 200.13,
                write_mib_s: 0.04,
                lat_us_p50: 18.2,
                lat_us_p99: 95.7,
                queue_depth: 32,
            }],
            pool: PoolSpace {
                total_bytes: 8 << 30,
                used_bytes: 2 << 30,
                free_bytes: 6 << 30,
            },
            jobs: vec![JobProgress {
                kind: JobKind::Inflate,
                volume: "c".into(),
                done_bytes: 1 << 30,
                total_bytes: 4 << 30,
                finished: false,
            }],
        };
        let text = render(&command(&["stats"]), serde_json::to_value(stats).unwrap()).unwrap();
        assert_eq!(
            text,
            "CORE  READ IOPS  WRITE IOPS  READ MiB/s  WRITE MiB/s  P50 us  P99 us  QD\n   \
             0      51234          10       200.1          0.0      18      96  32\n\
             \n\
             pool: 8.0 GiB total, 2.0 GiB used (25%), 6.0 GiB free\n\
             \n\
             JOB      VOLUME     DONE    TOTAL  PROGRESS\n\
             inflate  c       1.0 GiB  4.0 GiB       25%\n"
        );
    }

    #[test]
    fn mutations_print_one_line() {
        let info = serde_json::to_value(volume("v", 4 << 30, None, &[])).unwrap();
        assert_eq!(
            render(&command(&["volume", "create", "v", "4G"]), info).unwrap(),
            "created volume 'v': 4.0 GiB, 4096-byte blocks\n"
        );
        assert_eq!(
            render(&command(&["volume", "delete", "v"]), json!({})).unwrap(),
            "deleted volume 'v'\n"
        );
        let job = json!({"kind": "inflate", "volume": "c", "done_bytes": 0, "total_bytes": 1024, "finished": false});
        assert_eq!(
            render(&command(&["clone", "inflate", "c"]), job).unwrap(),
            "inflating 'c': 0 B of 1.0 KiB copied (0%); follow with `tessel stats`\n"
        );
    }

    #[test]
    fn data_of_the_wrong_shape_is_a_clear_error() {
        let err = render(&command(&["volume", "list"]), json!({"vols": []})).unwrap_err();
        assert_eq!(err.code, "bad_response");
        assert!(err.message.contains("volumes"), "{}", err.message);
    }

    #[test]
    fn unreachable_daemon_says_how_to_start_it() {
        let path =
            std::env::temp_dir().join(format!("tessel-admin-{}-none.sock", std::process::id()));
        let err = run(&command(&["volume", "list"]), &path, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach the daemon at {}: no such file or directory — is `tessel serve` running?",
                path.display()
            )
        );
    }

    #[test]
    fn daemon_errors_become_the_message() {
        let path =
            std::env::temp_dir().join(format!("tessel-admin-{}-err.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let reply =
                ControlResponse::error(proto::ErrorCode::UnknownVolume, "unknown volume 'x'");
            (&stream)
                .write_all(proto::encode_response(&reply).as_bytes())
                .unwrap();
        });
        let err = run(&command(&["volume", "info", "x"]), &path, false).unwrap_err();
        server.join().unwrap();
        assert_eq!(err.to_string(), "unknown volume 'x'");
        let _ = std::fs::remove_file(&path);
    }
}
