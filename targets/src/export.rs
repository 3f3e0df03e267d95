//! What a target session needs to know about the engine: the exports it may open, and the
//! actions it asks its driver to perform.

use tessel_engine::{Request, VolumeId};

/// One exportable image: a volume (read-write) or a snapshot (read-only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name: `vol` or `vol@snap`.
    pub name: String,
    /// Free text shown by NBD_OPT_LIST and iSCSI discovery.
    pub description: String,
    /// The engine's id for I/O.
    pub volume: VolumeId,
    /// Size in bytes.
    pub size: u64,
    /// Exported logical block size: 512 or 4096.
    pub block_size: u32,
    /// True for snapshots.
    pub read_only: bool,
}

/// The set of exports a session can see. Implemented by the daemon over the engine, and by
/// tests over a fixed list.
pub trait Exports {
    /// Every export, in a stable order.
    fn list(&self) -> Vec<ExportInfo>;
    /// The export of that name, if it exists now.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// The volume `volume` was cloned from, if it is a clone (also once inflated: its data
    /// came from there, and so do its iSCSI access rules).
    fn origin(&self, _volume: &str) -> Option<String> {
        None
    }
}

/// A fixed list of exports (tests, and the daemon's snapshot of the volume table).
impl Exports for Vec<ExportInfo> {
    fn list(&self) -> Vec<ExportInfo> {
        self.clone()
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.iter().find(|e| e.name == name).cloned()
    }
}

/// What a session asks its driver to do after consuming input or a completion.
#[derive(Debug, Default)]
pub struct Actions {
    /// Bytes to send to the peer, in order.
    pub send: Vec<u8>,
    /// Engine requests to submit; their completions come back through the session's
    /// `complete` method with the same tag.
    pub submit: Vec<Request>,
    /// Close the connection once `send` is written.
    pub close: bool,
    /// Upgrade the connection to TLS once `send` is written in plain text: every later byte,
    /// both ways, goes through TLS. The session consumed no input past the request for it
    /// (what follows is the client's TLS handshake).
    pub start_tls: bool,
}
