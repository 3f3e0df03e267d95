//! The control server: JSON lines over a unix socket (docs/control.md); each request runs
//! against the engine and gets one response line (clients.rs serves the socket).

use super::conn::{Entry, Registry, VolumeUse};
use super::exports::EngineExports;
use super::schedule::Schedules;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessel_engine::{percentile_us, ControlError, CoreCounters, Engine, IoError, SnapshotInfo};
use tessel_targets::control::proto::{self, ControlRequest, ControlResponse, ErrorCode};
use tessel_targets::export::Exports;

/// What the control server needs.
pub struct ControlServer {
    pub engine: Engine,
    pub exports: Arc<EngineExports>,
    pub schedules: Arc<Schedules>,
    /// Open host connections (NBD and iSCSI).
    pub connections: Arc<Registry>,
    pub shutdown: Sender<&'static str>,
    last: Mutex<(Instant, Vec<CoreCounters>)>,
}

fn code_of(e: &ControlError) -> ErrorCode {
    match e {
        ControlError::UnknownVolume(_) => ErrorCode::UnknownVolume,
        ControlError::UnknownSnapshot { .. } => ErrorCode::UnknownSnapshot,
        ControlError::Exists(_) => ErrorCode::AlreadyExists,
        ControlError::BadName(_) | ControlError::BadSize(_) | ControlError::BadBlockSize(_) => {
            ErrorCode::InvalidArgument
        }
        ControlError::InUse(_) => ErrorCode::InUse,
        ControlError::Protected(_) => ErrorCode::Protected,
        ControlError::Io(IoError::NoSpace) => ErrorCode::NoSpace,
        ControlError::ShuttingDown => ErrorCode::ShuttingDown,
        _ => ErrorCode::Internal,
    }
}

fn snapshot_info(s: SnapshotInfo) -> proto::SnapshotInfo {
    proto::SnapshotInfo {
        volume: s.volume,
        name: s.name,
        created_unix: s.created_unix,
        epoch: s.epoch,
        allocated_bytes: s.allocated_bytes,
        exclusive_bytes: s.exclusive_bytes,
        shared_bytes: s.shared_bytes,
        scheduled: s.scheduled,
        protected: s.protected,
    }
}

/// Refuse a destructive command while `users` are connected, unless forced; forced, close
/// their connections (they would read a deleted image).
fn refuse_or_close(users: &[Arc<Entry>], what: &str, force: bool) -> Result<(), ControlError> {
    if users.is_empty() {
        return Ok(());
    }
    if !force {
        let ids: Vec<String> = users.iter().map(|e| e.id.to_string()).collect();
        return Err(ControlError::InUse(format!(
            "{} host connection(s) are open on '{what}' (sessions {}); disconnect them \
             (`tessel session close ID`) or use --force",
            users.len(),
            ids.join(", ")
        )));
    }
    for e in users {
        tracing::warn!(session = e.id, peer = %e.peer, image = what, "closing a host connection: forced");
        e.close();
    }
    Ok(())
}

impl ControlServer {
    /// A server for `engine`.
    pub fn new(
        engine: Engine,
        exports: Arc<EngineExports>,
        schedules: Arc<Schedules>,
        connections: Arc<Registry>,
        shutdown: Sender<&'static str>,
    ) -> ControlServer {
        let now = engine.counters();
        ControlServer {
            engine,
            exports,
            schedules,
            connections,
            shutdown,
            last: Mutex::new((Instant::now(), now)),
        }
    }

    fn volume_id(&self, name: &str) -> Result<tessel_engine::VolumeId, ControlError> {
        Ok(self
            .engine
            .volume(name)
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?
            .id)
    }

    /// Open connections that use volume `id`: NBD on it, iSCSI on its target.
    fn users_of_volume(&self, id: tessel_engine::VolumeId) -> Vec<Arc<Entry>> {
        self.connections
            .matching(|u| u == VolumeUse::One(id) || u == VolumeUse::Target(id))
    }

    /// Open connections that use snapshot `volume@name`: NBD on it, and iSCSI on its
    /// volume's target while it is exported (a LUN of that target).
    fn users_of_snapshot(&self, volume: &str, name: &str) -> Result<Vec<Arc<Entry>>, ControlError> {
        let full = format!("{volume}@{name}");
        let vol = self.volume_id(volume)?;
        let snap = self
            .engine
            .image(&full)
            .ok_or_else(|| ControlError::UnknownSnapshot {
                volume: volume.into(),
                snapshot: name.into(),
            })?
            .0
            .id;
        let lun = self.exports.is_exported(&full);
        Ok(self
            .connections
            .matching(|u| u == VolumeUse::One(snap) || (lun && u == VolumeUse::Target(vol))))
    }

    fn snapshot_of(&self, volume: &str, name: &str) -> Result<proto::SnapshotInfo, ControlError> {
        self.engine
            .snapshots(Some(volume))?
            .into_iter()
            .find(|s| s.name == name)
            .map(snapshot_info)
            .ok_or_else(|| ControlError::UnknownSnapshot {
                volume: volume.into(),
                snapshot: name.into(),
            })
    }

    fn session_list(&self) -> proto::SessionList {
        let sessions = self
            .connections
            .sessions()
            .into_iter()
            .map(|e| {
                let (_, d) = e.state();
                proto::SessionInfo {
                    id: e.id,
                    protocol: e.protocol.to_string(),
                    peer: e.peer.to_string(),
                    export: d.export,
                    initiator: d.initiator,
                    target: d.target,
                    since_unix: e.since_unix,
                    in_flight: e.in_flight.load(Ordering::Relaxed),
                    read_bytes: e.read_bytes.load(Ordering::Relaxed),
                    written_bytes: e.written_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        proto::SessionList { sessions }
    }

    fn volume_info(&self, name: &str) -> Result<proto::VolumeInfo, ControlError> {
        let v = self
            .engine
            .volume(name)
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        Ok(proto::VolumeInfo {
            allocated_bytes: self.engine.allocated_bytes(v.id),
            origin: self.engine.origin_of(name),
            snapshots: self.engine.snapshot_names(name),
            name: v.name,
            size: v.size,
            block_size: v.block_size,
        })
    }

    fn stats(&self) -> proto::Stats {
        let now = self.engine.counters();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let secs = last.0.elapsed().as_secs_f64().max(1e-3);
        let cores = now
            .iter()
            .zip(last.1.iter())
            .map(|(n, p)| {
                let window: Vec<u64> = n
                    .latency
                    .iter()
                    .zip(&p.latency)
                    .map(|(a, b)| a - b)
                    .collect();
                (n, p, window)
            })
            .map(|(n, p, window)| proto::CoreStats {
                core: n.core as u32,
                read_iops: (n.reads - p.reads) as f64 / secs,
                write_iops: (n.writes - p.writes) as f64 / secs,
                read_mib_s: (n.read_bytes - p.read_bytes) as f64 / secs / 1048576.0,
                write_mib_s: (n.write_bytes - p.write_bytes) as f64 / secs / 1048576.0,
                lat_us_p50: percentile_us(&window, 0.50),
                lat_us_p99: percentile_us(&window, 0.99),
                queue_depth: n.in_flight as u32,
            })
            .collect();
        *last = (Instant::now(), now);
        let p = self.engine.pool_info();
        let jobs = self
            .engine
            .volumes()
            .iter()
            .filter_map(|v| {
                let pr = self.engine.inflate_progress(&v.name).ok()?;
                (pr.total > 0).then(|| proto::JobProgress {
                    kind: proto::JobKind::Inflate,
                    volume: v.name.clone(),
                    done_bytes: pr.done * p.cluster_size,
                    total_bytes: pr.total * p.cluster_size,
                    finished: pr.finished,
                })
            })
            .collect();
        proto::Stats {
            cores,
            pool: proto::PoolSpace {
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
                free_bytes: p.total_bytes - p.used_bytes,
            },
            jobs,
        }
    }

    fn inflate(&self, volume: &str, wait: bool) -> Result<ControlResponse, ControlError> {
        let mut pr = self.engine.clone_inflate(volume)?;
        while wait && !pr.finished {
            std::thread::sleep(Duration::from_millis(200));
            pr = self.engine.inflate_progress(volume)?;
        }
        let cs = self.engine.pool_info().cluster_size;
        Ok(ControlResponse::ok(&proto::JobProgress {
            kind: proto::JobKind::Inflate,
            volume: volume.to_string(),
            done_bytes: pr.done * cs,
            total_bytes: pr.total * cs,
            finished: pr.finished,
        }))
    }

    fn export_list(&self) -> proto::ExportList {
        let exports = self.exports.list();
        let sessions: Vec<VolumeUse> = self
            .connections
            .sessions()
            .iter()
            .map(|e| e.state().0)
            .collect();
        // An iSCSI session on a volume's target counts for the volume and for each of its
        // exported snapshots: they are all LUNs of that target.
        let target_of = |name: &str| {
            let volume = name.split('@').next().unwrap_or(name);
            exports.iter().find(|x| x.name == volume).map(|x| x.volume)
        };
        proto::ExportList {
            exports: exports
                .iter()
                .map(|e| {
                    let target = target_of(&e.name);
                    let connections = sessions
                        .iter()
                        .filter(|&&u| {
                            u == VolumeUse::One(e.volume)
                                || target.is_some_and(|t| u == VolumeUse::Target(t))
                        })
                        .count() as u32;
                    proto::ExportInfo {
                        name: e.name.clone(),
                        size: e.size,
                        block_size: e.block_size,
                        read_only: e.read_only,
                        connections,
                    }
                })
                .collect(),
        }
    }

    /// Run one request.
    pub fn handle(&self, req: ControlRequest) -> ControlResponse {
        self.run(req)
            .unwrap_or_else(|e| ControlResponse::error(code_of(&e), e.to_string()))
    }

    fn run(&self, req: ControlRequest) -> Result<ControlResponse, ControlError> {
        Ok(match req {
            ControlRequest::VolumeCreate {
                name,
                size,
                block_size,
            } => {
                self.engine.create_volume(&name, size, block_size)?;
                ControlResponse::ok(&self.volume_info(&name)?)
            }
            ControlRequest::VolumeDelete { name, force } => {
                let users = self.users_of_volume(self.volume_id(&name)?);
                refuse_or_close(&users, &name, force)?;
                self.exports
                    .origins
                    .volume_deleted(&name, || self.engine.delete_volume(&name))?;
                self.schedules.forget(&name);
                ControlResponse::done()
            }
            ControlRequest::VolumeResize { name, size } => {
                self.engine.resize_volume(&name, size)?;
                ControlResponse::ok(&self.volume_info(&name)?)
            }
            ControlRequest::VolumeList => {
                let mut volumes = Vec::new();
                for v in self.engine.volumes() {
                    volumes.push(self.volume_info(&v.name)?);
                }
                ControlResponse::ok(&proto::VolumeList { volumes })
            }
            ControlRequest::VolumeInfo { name } => ControlResponse::ok(&self.volume_info(&name)?),
            ControlRequest::VolumeRollback {
                volume,
                snapshot,
                force,
            } => {
                let open = self.users_of_volume(self.volume_id(&volume)?).len();
                if open > 0 && !force {
                    return Err(ControlError::InUse(format!(
                        "{open} host connection(s) are open and may be using '{volume}'; disconnect them or use --force"
                    )));
                }
                self.engine.rollback(&volume, &snapshot)?;
                ControlResponse::ok(&self.volume_info(&volume)?)
            }
            ControlRequest::SnapshotCreate { volume, name } => {
                self.engine.snapshot_create(&volume, &name)?;
                let info = self
                    .engine
                    .snapshots(Some(&volume))?
                    .into_iter()
                    .find(|s| s.name == name);
                match info {
                    Some(s) => ControlResponse::ok(&snapshot_info(s)),
                    None => {
                        return Err(ControlError::UnknownSnapshot {
                            volume,
                            snapshot: name,
                        })
                    }
                }
            }
            ControlRequest::SnapshotDelete {
                volume,
                name,
                force,
            } => {
                let full = format!("{volume}@{name}");
                let users = self.users_of_snapshot(&volume, &name)?;
                if self.snapshot_of(&volume, &name)?.protected {
                    return Err(ControlError::Protected(full));
                }
                refuse_or_close(&users, &full, force)?;
                self.engine.snapshot_delete(&volume, &name)?;
                self.exports.remove(&full);
                ControlResponse::done()
            }
            ControlRequest::SnapshotProtect { volume, name } => {
                self.engine.snapshot_protect(&volume, &name, true)?;
                ControlResponse::ok(&self.snapshot_of(&volume, &name)?)
            }
            ControlRequest::SnapshotUnprotect { volume, name } => {
                self.engine.snapshot_protect(&volume, &name, false)?;
                ControlResponse::ok(&self.snapshot_of(&volume, &name)?)
            }
            ControlRequest::SnapshotList { volume } => {
                let snapshots = self
                    .engine
                    .snapshots(volume.as_deref())?
                    .into_iter()
                    .map(snapshot_info)
                    .collect();
                ControlResponse::ok(&proto::SnapshotList { snapshots })
            }
            ControlRequest::CloneCreate {
                volume,
                snapshot,
                new_volume,
            } => {
                self.exports
                    .origins
                    .clone_created(&new_volume, &volume, || {
                        self.engine.clone_create(&volume, &snapshot, &new_volume)
                    })?;
                ControlResponse::ok(&self.volume_info(&new_volume)?)
            }
            ControlRequest::CloneInflate { volume, wait } => self.inflate(&volume, wait)?,
            ControlRequest::ExportAdd { name } => {
                if name.contains('@') && !self.exports.add(&name) {
                    return Ok(ControlResponse::error(
                        ErrorCode::UnknownExport,
                        format!("no snapshot '{name}'"),
                    ));
                }
                match self
                    .export_list()
                    .exports
                    .into_iter()
                    .find(|e| e.name == name)
                {
                    Some(e) => ControlResponse::ok(&e),
                    None => return Err(ControlError::UnknownVolume(name)),
                }
            }
            ControlRequest::ExportRemove { name } => {
                let users = match name.split_once('@') {
                    Some((volume, snap)) if self.exports.is_exported(&name) => {
                        self.users_of_snapshot(volume, snap)?
                    }
                    _ => Vec::new(),
                };
                if !self.exports.remove(&name) {
                    return Ok(ControlResponse::error(
                        ErrorCode::UnknownExport,
                        format!(
                            "'{name}' is not an exported snapshot (volumes are always exported)"
                        ),
                    ));
                }
                // Its hosts are disconnected: an NBD client would read on, and an iSCSI
                // session keeps its LUN table until it logs in again.
                for e in users {
                    tracing::info!(session = e.id, peer = %e.peer, export = %name, "closing a host connection: export removed");
                    e.close();
                }
                ControlResponse::done()
            }
            ControlRequest::ExportList => ControlResponse::ok(&self.export_list()),
            ControlRequest::Stats => ControlResponse::ok(&self.stats()),
            ControlRequest::ScheduleSet {
                volume,
                every_secs,
                keep,
            } => {
                let (every, keep) = if keep == 0 {
                    (0, 0)
                } else {
                    (every_secs, keep)
                };
                if let Err(m) = self.schedules.set(&volume, every, keep) {
                    return Ok(ControlResponse::error(ErrorCode::InvalidArgument, m));
                }
                match self
                    .schedules
                    .list()
                    .into_iter()
                    .find(|s| s.volume == volume)
                {
                    Some(s) => ControlResponse::ok(&s),
                    None => ControlResponse::done(),
                }
            }
            ControlRequest::ScheduleList => ControlResponse::ok(&proto::ScheduleList {
                schedules: self.schedules.list(),
            }),
            ControlRequest::ScheduleRemove { volume } => {
                if !self.schedules.list().iter().any(|s| s.volume == volume) {
                    return Ok(ControlResponse::error(
                        ErrorCode::UnknownSchedule,
                        format!("volume '{volume}' has no schedule"),
                    ));
                }
                if let Err(m) = self.schedules.set(&volume, 0, 0) {
                    return Ok(ControlResponse::error(ErrorCode::Internal, m));
                }
                ControlResponse::done()
            }
            ControlRequest::SessionList => ControlResponse::ok(&self.session_list()),
            ControlRequest::SessionClose { id } => match self.connections.session(id) {
                Some(e) => {
                    tracing::info!(session = id, peer = %e.peer, "closing a host connection: asked to");
                    e.close();
                    ControlResponse::done()
                }
                None => ControlResponse::error(
                    ErrorCode::UnknownSession,
                    format!("no open session {id}"),
                ),
            },
            ControlRequest::Shutdown => {
                let _ = self.shutdown.send("control request");
                ControlResponse::done()
            }
        })
    }
}

/// The control socket's file, removed when this is dropped (the daemon stops, or a later
/// startup step fails).
pub struct SocketFile {
    path: PathBuf,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Bind the control socket with mode 0600 whatever the umask, replacing a stale socket.
///
/// Refuses when a daemon answers there, and when the path is anything but a socket: a
/// mistyped `control_socket` naming a pool file must not delete it.
pub fn bind(path: &Path) -> std::io::Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another tessel daemon answers on this control socket",
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(meta) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "the path exists and is not a socket ({}); refusing to replace it: \
                     point daemon.control_socket elsewhere",
                    kind_of(&meta.file_type())
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // bind(2) creates the socket file with the umask's mode; narrow the umask for the call
    // so there is no moment when another user may connect, then set 0600 explicitly. Only
    // this thread runs at this point of startup, so the process-wide umask is ours to use.
    // SAFETY: umask(2) only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound?;
    let file = SocketFile {
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, file))
}

/// "regular file", "directory", ... for the refusal above.
fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else {
        "a fifo"
    }
}
