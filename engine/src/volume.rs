//! The volume table shared by clients and reactors for request validation.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// What the submit path needs to know about a volume (or a snapshot opened for reading).
#[derive(Debug)]
pub struct VolumeMeta {
    pub id: u64,
    pub name: String,
    pub block_size: u32,
    pub size: AtomicU64,
    pub read_only: bool,
    pub deleted: AtomicBool,
    pub created_unix: u64,
}

/// id → volume, written only by control operations.
#[derive(Default)]
pub struct VolumeTable {
    map: RwLock<HashMap<u64, Arc<VolumeMeta>>>,
}

impl VolumeTable {
    /// The volume with this id.
    pub fn get(&self, id: u64) -> Option<Arc<VolumeMeta>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
    /// The volume with this name.
    pub fn by_name(&self, name: &str) -> Option<Arc<VolumeMeta>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|v| v.name == name)
            .cloned()
    }
    /// Every volume, by name.
    pub fn all(&self) -> Vec<Arc<VolumeMeta>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
    /// Add a volume.
    pub fn insert(&self, m: Arc<VolumeMeta>) {
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(m.id, m);
    }
    /// Remove a volume; clients holding it see `deleted`.
    pub fn remove(&self, id: u64) -> Option<Arc<VolumeMeta>> {
        let m = self
            .map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let Some(m) = &m {
            m.deleted.store(true, Ordering::Release);
        }
        m
    }
}

/// A per-thread cache of the table, so the submit path takes no lock once warm.
#[derive(Default)]
pub struct MetaCache {
    map: rustc_hash::FxHashMap<u64, Arc<VolumeMeta>>,
}

impl MetaCache {
    /// The live volume with this id.
    #[inline]
    pub fn get(&mut self, table: &VolumeTable, id: u64) -> Option<&Arc<VolumeMeta>> {
        use std::collections::hash_map::Entry;
        match self.map.entry(id) {
            Entry::Occupied(o) if o.get().deleted.load(Ordering::Acquire) => {
                o.remove();
                None
            }
            Entry::Occupied(o) => Some(o.into_mut()),
            Entry::Vacant(v) => Some(v.insert(table.get(id)?)),
        }
    }
}
