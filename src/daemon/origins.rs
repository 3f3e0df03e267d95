//! The volume each clone was made from, kept for the iSCSI access rules: a clone follows
//! its origin's rule (docs/iscsi.md, "Access rules") also once inflated, when the engine
//! no longer records where it came from, and across restarts.
//!
//! Kept in `<data_dir>/clone-origins`, one `clone origin` pair a line (names have no
//! spaces), rewritten whole (temporary file, fsync, rename, fsync of the directory) on each
//! change. At start the file is brought in line with the engine: pairs whose clone no longer
//! exists go (a delete the file missed), and clones not yet inflated are read from the
//! engine (a clone the file missed: the control log made it exist before the file was
//! written).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use tessel_engine::Engine;

/// Clone → origin volume, read by sessions on reactor threads, changed by control requests.
pub struct Origins {
    path: PathBuf,
    map: RwLock<HashMap<String, String>>,
    /// Held across a change's engine operation and the map update, so that a delete and a
    /// clone of the same name, from two control clients, cannot interleave.
    changes: Mutex<()>,
}

/// The file's name in the data directory.
pub const FILE: &str = "clone-origins";

impl Origins {
    /// Reads `path` (missing: no clones yet) and reconciles it with `engine`.
    pub fn open(path: &Path, engine: &Engine) -> std::io::Result<Origins> {
        let mut map = HashMap::new();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                for (n, line) in text.lines().enumerate() {
                    match line.split_once(' ') {
                        Some((clone, origin)) if !origin.contains(' ') => {
                            map.insert(clone.to_string(), origin.to_string());
                        }
                        _ if line.is_empty() || line.starts_with('#') => {}
                        _ => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("{}:{}: not a `clone origin` pair", path.display(), n + 1),
                            ))
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let before = map.clone();
        map.retain(|clone, _| engine.volume(clone).is_some());
        for v in engine.volumes() {
            if let Some(snapshot) = engine.origin_of(&v.name) {
                let origin = snapshot
                    .split_once('@')
                    .map_or(snapshot.as_str(), |(o, _)| o);
                map.insert(v.name, origin.to_string());
            }
        }
        let origins = Origins {
            path: path.to_path_buf(),
            map: RwLock::new(map),
            changes: Mutex::new(()),
        };
        if *origins.read() != before {
            origins.save()?;
        }
        Ok(origins)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, String>> {
        self.map.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The volume `clone` was made from.
    pub fn get(&self, clone: &str) -> Option<String> {
        self.read().get(clone).cloned()
    }

    /// Runs `create`, which makes `clone` a clone of a snapshot of `origin`, and records it.
    pub fn clone_created<R, E>(
        &self,
        clone: &str,
        origin: &str,
        create: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, E> {
        self.change(create, |map| {
            map.insert(clone.to_string(), origin.to_string());
        })
    }

    /// Runs `delete`, which deletes `volume`, and forgets where it came from (clones made
    /// from it keep their origin: they hold its data).
    pub fn volume_deleted<R, E>(
        &self,
        volume: &str,
        delete: impl FnOnce() -> Result<R, E>,
    ) -> Result<R, E> {
        self.change(delete, |map| {
            map.remove(volume);
        })
    }

    fn change<R, E>(
        &self,
        op: impl FnOnce() -> Result<R, E>,
        update: impl FnOnce(&mut HashMap<String, String>),
    ) -> Result<R, E> {
        let _serial = self.changes.lock().unwrap_or_else(|p| p.into_inner());
        let r = op()?;
        update(&mut self.map.write().unwrap_or_else(|p| p.into_inner()));
        // The operation is done in the engine; what the file misses now is written with
        // the next change, and a clone not yet inflated is read back from the engine at
        // start.
        if let Err(e) = self.save() {
            tracing::error!(path = %self.path.display(), "clone origins not saved: {e}");
        }
        Ok(r)
    }

    /// Rewrites the file with the whole map, atomically.
    fn save(&self) -> std::io::Result<()> {
        let mut text =
            String::from("# tessel: clone origin (the volume each clone was made from)\n");
        let mut pairs: Vec<_> = self
            .read()
            .iter()
            .map(|(c, o)| format!("{c} {o}\n"))
            .collect();
        pairs.sort();
        text.extend(pairs);
        replace_file(&self.path, text.as_bytes())
    }
}

/// Replace `path` with `bytes` (mode 0600) so that a crash leaves the old file or the new
/// one: a temporary file, fsync, rename, fsync of the directory.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .mode(0o600)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
