//! The control protocol's messages: one JSON object per line, a request from the admin
//! client, one response from the daemon. Documented for other languages in docs/control.md.
//!
//! Codecs are pure functions over lines, tested without sockets. Response data structs accept
//! fields they do not know, so the daemon may add fields without breaking older clients.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Longest line either side accepts; a volume list of thousands of volumes stays far below.
pub const MAX_LINE: usize = 16 << 20;

/// One administrative request. On the wire: `{"op": "volume_create", "name": "v", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Create a thin volume. Data: [`VolumeInfo`].
    VolumeCreate {
        name: String,
        /// Bytes, a multiple of `block_size`.
        size: u64,
        /// 512 or 4096; 4096 when omitted.
        #[serde(default = "default_block_size")]
        block_size: u32,
    },
    /// Delete a volume that has no snapshots. Without `force`, refused while hosts are
    /// connected to it; with it, their connections are closed. Data: `{}`.
    VolumeDelete {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Grow a volume to `size` bytes. Data: [`VolumeInfo`].
    VolumeResize { name: String, size: u64 },
    /// Every volume. Data: [`VolumeList`].
    VolumeList,
    /// One volume. Data: [`VolumeInfo`].
    VolumeInfo { name: String },
    /// Make the volume's contents those of one of its snapshots. Without `force`, refused
    /// while the volume is exported with connected clients or newer snapshots exist.
    /// Data: [`VolumeInfo`].
    VolumeRollback {
        volume: String,
        snapshot: String,
        #[serde(default)]
        force: bool,
    },
    /// Take a crash-consistent snapshot. Data: [`SnapshotInfo`].
    SnapshotCreate { volume: String, name: String },
    /// Delete a snapshot that no clone depends on and that is not protected. Without
    /// `force`, refused while hosts are connected to it; with it, their connections are
    /// closed. Data: `{}`.
    SnapshotDelete {
        volume: String,
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// Protect a snapshot: nothing deletes it (by hand, a schedule's expiry) until it is
    /// unprotected. Data: [`SnapshotInfo`].
    SnapshotProtect { volume: String, name: String },
    /// Lift a snapshot's protection. Data: [`SnapshotInfo`].
    SnapshotUnprotect { volume: String, name: String },
    /// Snapshots of one volume, or of all when `volume` is absent. Data: [`SnapshotList`].
    SnapshotList {
        #[serde(default)]
        volume: Option<String>,
    },
    /// A writable clone of `volume@snapshot` named `new_volume`. Data: [`VolumeInfo`].
    CloneCreate {
        volume: String,
        snapshot: String,
        new_volume: String,
    },
    /// Copy everything a clone still reads from its origin, making it independent. With
    /// `wait`, the response comes when the copy is done. Data: [`JobProgress`].
    CloneInflate {
        volume: String,
        #[serde(default)]
        wait: bool,
    },
    /// Export a volume (`vol`) or snapshot (`vol@snap`) over NBD and iSCSI. Data: [`ExportInfo`].
    ExportAdd { name: String },
    /// Stop exporting; connected clients are disconnected. Data: `{}`.
    ExportRemove { name: String },
    /// Every export. Data: [`ExportList`].
    ExportList,
    /// Counters and pool space. Data: [`Stats`].
    Stats,
    /// Snapshot `volume` every `every_secs` and keep the newest `keep` scheduled snapshots;
    /// `keep = 0` removes the schedule. Data: [`ScheduleInfo`].
    ScheduleSet {
        volume: String,
        every_secs: u64,
        keep: u32,
    },
    /// Remove a volume's schedule; its scheduled snapshots stay. Data: `{}`.
    ScheduleRemove { volume: String },
    /// Every schedule. Data: [`ScheduleList`].
    ScheduleList,
    /// Every open NBD connection and iSCSI session. Data: [`SessionList`].
    SessionList,
    /// Close one NBD connection or iSCSI session (from `session_list`). Data: `{}`.
    SessionClose { id: u64 },
    /// Stop the daemon gracefully (as SIGTERM does). Data: `{}`.
    Shutdown,
}

fn default_block_size() -> u32 {
    4096
}

/// The daemon's answer. On the wire: `{"status": "ok", "data": {...}}` or
/// `{"status": "error", "code": "unknown_volume", "message": "unknown volume 'x'"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Success, with the request's data (see each request for its type).
    Ok { data: serde_json::Value },
    /// Failure: a stable machine-readable `code` (an [`ErrorCode`] name) and a message for
    /// people that names the input at fault.
    Error { code: String, message: String },
}

impl ControlResponse {
    /// A success carrying `data`.
    pub fn ok<T: Serialize>(data: &T) -> ControlResponse {
        match serde_json::to_value(data) {
            Ok(data) => ControlResponse::Ok { data },
            Err(e) => {
                ControlResponse::error(ErrorCode::Internal, format!("cannot encode reply: {e}"))
            }
        }
    }

    /// A success with no data (`{}`).
    pub fn done() -> ControlResponse {
        ControlResponse::Ok {
            data: serde_json::Value::Object(Default::default()),
        }
    }

    /// A failure.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> ControlResponse {
        ControlResponse::Error {
            code: code.as_str().to_string(),
            message: message.into(),
        }
    }

    /// The data as `T`, or the daemon's error.
    pub fn into_data<T: DeserializeOwned>(self) -> Result<T, ResponseError> {
        match self {
            ControlResponse::Ok { data } => {
                serde_json::from_value(data).map_err(|e| ResponseError {
                    code: "bad_response".to_string(),
                    message: format!("unexpected reply data: {e}"),
                })
            }
            ControlResponse::Error { code, message } => Err(ResponseError { code, message }),
        }
    }
}

/// An error response, as a Rust error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseError {
    /// The stable code, e.g. `unknown_volume`.
    pub code: String,
    /// The message for people.
    pub message: String,
}

impl std::fmt::Display for ResponseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ResponseError {}

/// The error codes the daemon uses. Clients should treat an unknown code like `internal`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request line is not valid JSON or not a known request.
    BadRequest,
    /// An argument is out of range or malformed (size, block size, name).
    InvalidArgument,
    /// No volume of that name.
    UnknownVolume,
    /// No snapshot of that name on that volume.
    UnknownSnapshot,
    /// No export of that name.
    UnknownExport,
    /// No schedule for that volume.
    UnknownSchedule,
    /// No open session with that id.
    UnknownSession,
    /// The snapshot is protected (`snapshot_unprotect` first).
    Protected,
    /// A volume, snapshot or export of that name exists already.
    AlreadyExists,
    /// Something depends on it (clones of a snapshot, connected clients, newer snapshots).
    InUse,
    /// The pool has no free clusters for this.
    NoSpace,
    /// The daemon is shutting down.
    ShuttingDown,
    /// A failure inside the daemon (I/O error, a bug); the message says which.
    Internal,
}

impl ErrorCode {
    /// The wire name, e.g. `unknown_volume`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::UnknownVolume => "unknown_volume",
            ErrorCode::UnknownSnapshot => "unknown_snapshot",
            ErrorCode::UnknownExport => "unknown_export",
            ErrorCode::UnknownSchedule => "unknown_schedule",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::Protected => "protected",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::InUse => "in_use",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Data of volume create/resize/info/rollback and clone create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Exported block size: 512 or 4096.
    pub block_size: u32,
    /// Bytes of pool space the live volume references (shared with snapshots or not).
    pub allocated_bytes: u64,
    /// For a clone not yet inflated: `volume@snapshot` it was made from.
    #[serde(default)]
    pub origin: Option<String>,
    /// Its snapshots' names, oldest first.
    #[serde(default)]
    pub snapshots: Vec<String>,
}

/// Data of volume list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    pub volumes: Vec<VolumeInfo>,
}

/// Data of snapshot create, and each entry of a snapshot list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// The pool epoch the snapshot froze.
    pub epoch: u64,
    /// Bytes of pool space the snapshot references.
    pub allocated_bytes: u64,
    /// Bytes only this snapshot references: what deleting it frees.
    pub exclusive_bytes: u64,
    /// Bytes it shares with the volume, other snapshots or clones.
    pub shared_bytes: u64,
    /// Taken by a schedule (and so expired by it once older than its `keep` newest).
    #[serde(default)]
    pub scheduled: bool,
    /// Protected from deletion.
    #[serde(default)]
    pub protected: bool,
}

/// Data of snapshot list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
}

/// Data of export add, and each entry of an export list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    /// `vol` or `vol@snap`.
    pub name: String,
    pub size: u64,
    pub block_size: u32,
    /// True for snapshots.
    pub read_only: bool,
    /// Open NBD connections and iSCSI sessions to it.
    #[serde(default)]
    pub connections: u32,
}

/// Data of export list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportList {
    pub exports: Vec<ExportInfo>,
}

/// Data of schedule set, and each entry of a schedule list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    pub volume: String,
    pub every_secs: u64,
    pub keep: u32,
    /// When the next snapshot is due, seconds since the Unix epoch.
    #[serde(default)]
    pub next_unix: Option<u64>,
}

/// One open host connection: an NBD connection or an iSCSI session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// For `session_close`; unique while the daemon runs.
    pub id: u64,
    /// `nbd` or `iscsi`.
    pub protocol: String,
    /// The host's address and port.
    pub peer: String,
    /// NBD: the export chosen (absent during the handshake).
    #[serde(default)]
    pub export: Option<String>,
    /// iSCSI: the initiator's IQN.
    #[serde(default)]
    pub initiator: Option<String>,
    /// iSCSI: the target's IQN (absent for discovery sessions and during login).
    #[serde(default)]
    pub target: Option<String>,
    /// When it connected, seconds since the Unix epoch.
    pub since_unix: u64,
    /// Engine requests submitted and not completed.
    pub in_flight: u64,
    /// Bytes the host read and wrote.
    pub read_bytes: u64,
    pub written_bytes: u64,
}

/// Data of session list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

/// Data of schedule list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleInfo>,
}

/// Data of stats.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// One entry per reactor, averaged over the last second.
    pub cores: Vec<CoreStats>,
    pub pool: PoolSpace,
    /// Background fill and inflate work in progress.
    #[serde(default)]
    pub jobs: Vec<JobProgress>,
}

/// One reactor's recent activity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CoreStats {
    pub core: u32,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_mib_s: f64,
    pub write_mib_s: f64,
    pub lat_us_p50: f64,
    pub lat_us_p99: f64,
    /// Requests in flight on this reactor now.
    pub queue_depth: u32,
}

/// Pool space in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpace {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
}

/// What kind of background copy a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Completing redirected clusters from their parents.
    Fill,
    /// Making a clone independent of its origin.
    Inflate,
}

/// Progress of a fill or inflate, and the data of clone inflate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgress {
    pub kind: JobKind,
    pub volume: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// True once nothing is left to copy.
    pub finished: bool,
}

/// Why a line could not be decoded.
#[derive(Debug)]
pub struct DecodeError(serde_json::Error);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for DecodeError {}

fn encode_line<T: Serialize>(message: &T) -> String {
    // Our types hold only strings, numbers and maps with string keys: cannot fail.
    let mut line = serde_json::to_string(message).expect("control messages serialize");
    line.push('\n');
    line
}

/// A request as one line, newline included.
pub fn encode_request(request: &ControlRequest) -> String {
    encode_line(request)
}

/// A response as one line, newline included.
pub fn encode_response(response: &ControlResponse) -> String {
    encode_line(response)
}

/// Decodes a request line; on failure, the `bad_request` response to send back.
pub fn decode_request(line: &str) -> Result<ControlRequest, ControlResponse> {
    serde_json::from_str(line.trim_end())
        .map_err(|e| ControlResponse::error(ErrorCode::BadRequest, format!("bad request: {e}")))
}

/// Decodes a response line.
pub fn decode_response(line: &str) -> Result<ControlResponse, DecodeError> {
    serde_json::from_str(line.trim_end()).map_err(DecodeError)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn every_request() -> Vec<ControlRequest> {
        let s = |v: &str| v.to_string();
        vec![
            ControlRequest::VolumeCreate {
                name: s("v"),
                size: 4 << 30,
                block_size: 512,
            },
            ControlRequest::VolumeDelete {
                name: s("v"),
                force: true,
            },
            ControlRequest::VolumeResize {
                name: s("v"),
                size: 8 << 30,
            },
            ControlRequest::VolumeList,
            ControlRequest::VolumeInfo { name: s("v") },
            ControlRequest::VolumeRollback {
                volume: s("v"),
                snapshot: s("s"),
                force: true,
            },
            ControlRequest::SnapshotCreate {
                volume: s("v"),
                name: s("s"),
            },
            ControlRequest::SnapshotDelete {
                volume: s("v"),
                name: s("s"),
                force: false,
            },
            ControlRequest::SnapshotProtect {
                volume: s("v"),
                name: s("s"),
            },
            ControlRequest::SnapshotUnprotect {
                volume: s("v"),
                name: s("s"),
            },
            ControlRequest::SnapshotList { volume: None },
            ControlRequest::SnapshotList {
                volume: Some(s("v")),
            },
            ControlRequest::CloneCreate {
                volume: s("v"),
                snapshot: s("s"),
                new_volume: s("c"),
            },
            ControlRequest::CloneInflate {
                volume: s("c"),
                wait: true,
            },
            ControlRequest::ExportAdd { name: s("v@s") },
            ControlRequest::ExportRemove { name: s("v@s") },
            ControlRequest::ExportList,
            ControlRequest::Stats,
            ControlRequest::ScheduleSet {
                volume: s("v"),
                every_secs: 3600,
                keep: 24,
            },
            ControlRequest::ScheduleRemove { volume: s("v") },
            ControlRequest::ScheduleList,
            ControlRequest::SessionList,
            ControlRequest::SessionClose { id: 7 },
            ControlRequest::Shutdown,
        ]
    }

    #[test]
    fn every_request_round_trips_as_one_line() {
        for request in every_request() {
            let line = encode_request(&request);
            assert!(
                line.ends_with('\n') && !line[..line.len() - 1].contains('\n'),
                "{line}"
            );
            assert_eq!(decode_request(&line), Ok(request));
        }
    }

    #[test]
    fn requests_use_the_documented_wire_names() {
        let line = encode_request(&ControlRequest::VolumeCreate {
            name: "v".into(),
            size: 4096,
            block_size: 4096,
        });
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value,
            json!({"op": "volume_create", "name": "v", "size": 4096, "block_size": 4096})
        );
        assert_eq!(
            decode_request(r#"{"op":"volume_list"}"#),
            Ok(ControlRequest::VolumeList)
        );
    }

    #[test]
    fn optional_request_fields_take_their_defaults() {
        assert_eq!(
            decode_request(r#"{"op":"volume_create","name":"v","size":4096}"#),
            Ok(ControlRequest::VolumeCreate {
                name: "v".into(),
                size: 4096,
                block_size: 4096
            })
        );
        assert_eq!(
            decode_request(r#"{"op":"snapshot_list"}"#),
            Ok(ControlRequest::SnapshotList { volume: None })
        );
        assert_eq!(
            decode_request(r#"{"op":"clone_inflate","volume":"c"}"#),
            Ok(ControlRequest::CloneInflate {
                volume: "c".into(),
                wait: false
            })
        );
    }

    #[test]
    fn malformed_requests_get_a_bad_request_response() {
        for line in [
            "not json",
            r#"{"op":"format_disk"}"#,
            r#"{"op":"volume_info"}"#,
            r#"{"op":"volume_info","name":"v","colour":"red"}"#,
            r#"{"op":"volume_create","name":"v","size":-1}"#,
        ] {
            match decode_request(line) {
                Err(ControlResponse::Error { code, message }) => {
                    assert_eq!(code, "bad_request", "{line}");
                    assert!(message.starts_with("bad request: "), "{message}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn responses_round_trip_and_carry_typed_data() {
        let info = VolumeInfo {
            name: "v".into(),
            size: 4 << 30,
            block_size: 4096,
            allocated_bytes: 65536,
            origin: Some("base@gold".into()),
            snapshots: vec!["a".into(), "b".into()],
        };
        let response = ControlResponse::ok(&info);
        let line = encode_response(&response);
        assert!(line.starts_with(r#"{"status":"ok","data":{"#), "{line}");
        let back = decode_response(&line).unwrap();
        assert_eq!(back, response);
        assert_eq!(back.into_data::<VolumeInfo>(), Ok(info));
    }

    #[test]
    fn error_responses_round_trip_with_their_code() {
        let response = ControlResponse::error(ErrorCode::UnknownVolume, "unknown volume 'x'");
        let line = encode_response(&response);
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            value,
            json!({"status": "error", "code": "unknown_volume", "message": "unknown volume 'x'"})
        );
        let err = decode_response(&line)
            .unwrap()
            .into_data::<VolumeInfo>()
            .unwrap_err();
        assert_eq!(err.code, "unknown_volume");
        assert_eq!(err.to_string(), "unknown volume 'x'");
    }

    #[test]
    fn data_structs_accept_fields_added_by_newer_daemons() {
        let data = json!({
            "cores": [{"core": 0, "read_iops": 1.0, "write_iops": 2.0, "read_mib_s": 0.5,
                       "write_mib_s": 0.25, "lat_us_p50": 20.0, "lat_us_p99": 80.0,
                       "queue_depth": 3, "future_counter": 7}],
            "pool": {"total_bytes": 100, "used_bytes": 40, "free_bytes": 60},
            "jobs": [{"kind": "inflate", "volume": "c", "done_bytes": 1, "total_bytes": 2,
                      "finished": false}],
            "uptime_secs": 12
        });
        let stats = ControlResponse::Ok { data }.into_data::<Stats>().unwrap();
        assert_eq!(stats.cores[0].queue_depth, 3);
        assert_eq!(stats.pool.free_bytes, 60);
        assert_eq!(stats.jobs[0].kind, JobKind::Inflate);
    }

    #[test]
    fn done_is_an_empty_object() {
        assert_eq!(
            encode_response(&ControlResponse::done()),
            "{\"status\":\"ok\",\"data\":{}}\n"
        );
    }
}
