//! The control server: JSON lines over a unix socket (docs/control.md), one thread per
//! client; each request runs against the engine and gets one response line.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tessel_engine::{ControlError, CoreCounters, Engine, IoError};
use tessel_targets::control::proto::{self, ControlRequest, ControlResponse, ErrorCode};

/// What the control server needs.
pub struct ControlServer {
    pub engine: Engine,
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
        ControlError::Io(IoError::NoSpace) => ErrorCode::NoSpace,
        ControlError::ShuttingDown => ErrorCode::ShuttingDown,
        _ => ErrorCode::Internal,
    }
}

fn not_yet(what: &str) -> ControlResponse {
    ControlResponse::error(
        ErrorCode::BadRequest,
        format!("{what} is not available in this build yet (snapshots and clones: issue 3)"),
    )
}

impl ControlServer {
    /// A server for `engine`.
    pub fn new(engine: Engine, shutdown: Sender<&'static str>) -> ControlServer {
        let now = engine.counters();
        ControlServer {
            engine,
            shutdown,
            last: Mutex::new((Instant::now(), now)),
        }
    }

    fn volume_info(&self, name: &str) -> Result<proto::VolumeInfo, ControlError> {
        let v = self
            .engine
            .volume(name)
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        Ok(proto::VolumeInfo {
            allocated_bytes: self.engine.allocated_bytes(v.id),
            name: v.name,
            size: v.size,
            block_size: v.block_size,
            origin: None,
            snapshots: Vec::new(),
        })
    }

    fn stats(&self) -> proto::Stats {
        let now = self.engine.counters();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let secs = last.0.elapsed().as_secs_f64().max(1e-3);
        let cores = now
            .iter()
            .zip(last.1.iter())
            .map(|(n, p)| proto::CoreStats {
                core: n.core as u32,
                read_iops: (n.reads - p.reads) as f64 / secs,
                write_iops: (n.writes - p.writes) as f64 / secs,
                read_mib_s: (n.read_bytes - p.read_bytes) as f64 / secs / 1048576.0,
                write_mib_s: (n.write_bytes - p.write_bytes) as f64 / secs / 1048576.0,
                lat_us_p50: 0.0,
                lat_us_p99: 0.0,
                queue_depth: 0,
            })
            .collect();
        *last = (Instant::now(), now);
        let p = self.engine.pool_info();
        proto::Stats {
            cores,
            pool: proto::PoolSpace {
                total_bytes: p.total_bytes,
                used_bytes: p.used_bytes,
                free_bytes: p.total_bytes - p.used_bytes,
            },
            jobs: Vec::new(),
        }
    }

    /// Run one request.
    pub fn handle(&self, req: ControlRequest) -> ControlResponse {
        let r: Result<ControlResponse, ControlError> = (|| {
            Ok(match req {
                ControlRequest::VolumeCreate {
                    name,
                    size,
                    block_size,
                } => {
                    self.engine.create_volume(&name, size, block_size)?;
                    ControlResponse::ok(&self.volume_info(&name)?)
                }
                ControlRequest::VolumeDelete { name } => {
                    self.engine.delete_volume(&name)?;
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
                ControlRequest::VolumeInfo { name } => {
                    ControlResponse::ok(&self.volume_info(&name)?)
                }
                ControlRequest::ExportList => {
                    let exports = self
                        .engine
                        .volumes()
                        .into_iter()
                        .map(|v| proto::ExportInfo {
                            name: v.name,
                            size: v.size,
                            block_size: v.block_size,
                            read_only: false,
                            connections: 0,
                        })
                        .collect();
                    ControlResponse::ok(&proto::ExportList { exports })
                }
                ControlRequest::Stats => ControlResponse::ok(&self.stats()),
                ControlRequest::Shutdown => {
                    let _ = self.shutdown.send("control request");
                    ControlResponse::done()
                }
                ControlRequest::SnapshotCreate { .. }
                | ControlRequest::SnapshotDelete { .. }
                | ControlRequest::SnapshotList { .. } => not_yet("snapshot"),
                ControlRequest::CloneCreate { .. } | ControlRequest::CloneInflate { .. } => {
                    not_yet("clone")
                }
                ControlRequest::VolumeRollback { .. } => not_yet("rollback"),
                ControlRequest::ExportAdd { .. } | ControlRequest::ExportRemove { .. } => {
                    not_yet("exporting snapshots (every volume is exported under its name)")
                }
                ControlRequest::ScheduleSet { .. } | ControlRequest::ScheduleList => {
                    not_yet("snapshot schedules")
                }
            })
        })();
        r.unwrap_or_else(|e| ControlResponse::error(code_of(&e), e.to_string()))
    }

    fn serve_client(&self, stream: UnixStream) {
        let Ok(write_half) = stream.try_clone() else {
            return;
        };
        let mut out = write_half;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if line.trim().is_empty() {
                continue;
            }
            let resp = match proto::decode_request(&line) {
                Ok(req) => {
                    tracing::debug!(?req, "control request");
                    self.handle(req)
                }
                Err(resp) => resp,
            };
            let mut text = proto::encode_response(&resp);
            text.push('\n');
            if out.write_all(text.as_bytes()).is_err() {
                break;
            }
        }
    }
}

/// Bind the control socket, replacing a stale one (refusing if a daemon answers there).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{}: another tessel daemon answers on this control socket",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    UnixListener::bind(path)
}

/// Serve clients until the listener is closed.
pub fn serve(listener: UnixListener, server: Arc<ControlServer>, path: PathBuf) {
    for stream in listener.incoming() {
        match stream {
            Ok(s) => {
                let server = server.clone();
                let _ = std::thread::Builder::new()
                    .name("control-client".into())
                    .spawn(move || server.serve_client(s));
            }
            Err(e) => {
                tracing::warn!(socket = %path.display(), "control accept failed: {e}");
                break;
            }
        }
    }
}
