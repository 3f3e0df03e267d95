//! The exports target sessions see: every volume read-write under its own name, and the
//! snapshots an operator exported (`[[export]]` or `tessel export add vol@snap`) read-only
//! as `vol@snap`.

use super::origins::Origins;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use tessel_engine::Engine;
use tessel_targets::export::{ExportInfo, Exports};

/// Exports backed by the engine's volume table.
pub struct EngineExports {
    pub engine: Engine,
    snapshots: Mutex<BTreeSet<String>>,
    /// Where each clone came from (iSCSI access rules follow it).
    pub origins: Arc<Origins>,
}

impl EngineExports {
    /// Volumes only, until snapshots are added.
    pub fn new(engine: Engine, origins: Arc<Origins>) -> EngineExports {
        EngineExports {
            engine,
            snapshots: Mutex::new(BTreeSet::new()),
            origins,
        }
    }

    fn set(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.snapshots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Export a snapshot (`vol@snap`) read-only. False when no such snapshot exists.
    pub fn add(&self, name: &str) -> bool {
        let ok = name.contains('@') && self.engine.image(name).is_some();
        if ok {
            self.set().insert(name.to_string());
        }
        ok
    }

    /// True when the snapshot `vol@snap` is exported.
    pub fn is_exported(&self, name: &str) -> bool {
        self.set().contains(name)
    }

    /// Stop exporting a snapshot. False when it was not exported.
    pub fn remove(&self, name: &str) -> bool {
        self.set().remove(name)
    }

    /// Called on reactor threads (session handshakes): only the engine's lock-free
    /// lookups, never its control lock (a checkpoint holds it while it waits for every
    /// reactor, so a session blocking on it deadlocks the daemon).
    fn info(&self, name: &str) -> Option<ExportInfo> {
        let (v, read_only) = self.engine.image_nowait(name)?;
        Some(ExportInfo {
            description: format!(
                "tessel {} {} ({} bytes, {}-byte blocks)",
                if read_only { "snapshot" } else { "volume" },
                v.name,
                v.size,
                v.block_size
            ),
            name: v.name,
            volume: v.id,
            size: v.size,
            block_size: v.block_size,
            read_only,
        })
    }
}

impl Exports for EngineExports {
    fn list(&self) -> Vec<ExportInfo> {
        let mut out: Vec<ExportInfo> = self
            .engine
            .volumes_nowait()
            .iter()
            .filter_map(|v| self.info(&v.name))
            .collect();
        let snaps: Vec<String> = self.set().iter().cloned().collect();
        out.extend(snaps.iter().filter_map(|n| self.info(n)));
        out
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        if name.contains('@') && !self.set().contains(name) {
            return None;
        }
        self.info(name)
    }

    fn origin(&self, volume: &str) -> Option<String> {
        self.origins.get(volume)
    }
}
