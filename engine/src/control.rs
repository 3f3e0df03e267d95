//! Volume control: create, delete, grow and list volumes, and the views of a volume record
//! that the reactors, the submit path and the control plane keep.

use crate::engine::{now_unix, valid_name, Engine, VolumeInfo};
use crate::error::ControlError;
use crate::io::VolumeId;
use crate::journal::{ImageKind, Record, VolumeRecord};
use crate::reactor::VolState;
use crate::volume::VolumeMeta;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

impl Engine {
    /// Create a thin volume.
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
    ) -> Result<VolumeInfo, ControlError> {
        if !valid_name(name) {
            return Err(ControlError::BadName(name.into()));
        }
        if block_size != 512 && block_size != 4096 {
            return Err(ControlError::BadBlockSize(block_size));
        }
        check_size(size, block_size)?;
        let mut c = self.control();
        if c.find_volume(name).is_some() {
            return Err(ControlError::Exists(name.into()));
        }
        let v = VolumeRecord {
            id: c.state.next_volume_id,
            name: name.into(),
            size,
            block_size,
            created_unix: now_unix(),
            kind: ImageKind::Volume,
            of: crate::map::NONE,
            epoch: 0,
            flags: 0,
        };
        self.log_control(&mut c, Record::VolumeCreate(v.clone()))?;
        c.state.next_volume_id += 1;
        c.state.volumes.insert(v.id, v.clone());
        let vr = v.clone();
        self.on_all(move |r| {
            r.vols.insert(vr.id, vol_state(&vr));
        });
        self.inner
            .shared
            .volumes
            .insert(Arc::new(meta_of(&v, None)));
        tracing::info!(volume = name, size, block_size, "volume created");
        Ok(info_of(&v))
    }

    /// Delete a volume and free its clusters.
    pub fn delete_volume(&self, name: &str) -> Result<(), ControlError> {
        let mut c = self.control_idle(name);
        let id = c
            .find_volume(name)
            .map(|v| v.id)
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        let snaps: Vec<String> = c.snapshots_of(id).iter().map(|s| s.name.clone()).collect();
        if !snaps.is_empty() {
            return Err(ControlError::InUse(format!(
                "volume '{name}' has snapshots ({}); delete them first",
                snaps.join(", ")
            )));
        }
        self.log_control(&mut c, Record::VolumeDelete { id })?;
        c.state.volumes.remove(&id);
        self.inner.shared.volumes.remove(id);
        self.on_all(move |r| {
            if let Some(v) = r.vols.get_mut(&id) {
                v.deleting = true;
                if v.inflight == 0 {
                    r.drop_image(id);
                }
            }
        });
        tracing::info!(volume = name, "volume deleted");
        Ok(())
    }

    /// Grow a volume.
    pub fn resize_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, ControlError> {
        let mut c = self.control_idle(name);
        let v = c
            .find_volume(name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownVolume(name.into()))?;
        check_size(size, v.block_size)?;
        if size < v.size {
            return Err(ControlError::BadSize(format!(
                "{size} is smaller than the current size {}; volumes only grow",
                v.size
            )));
        }
        self.log_control(&mut c, Record::VolumeResize { id: v.id, size })?;
        let id = v.id;
        if let Some(rec) = c.state.volumes.get_mut(&id) {
            rec.size = size;
        }
        self.on_all(move |r| {
            if let Some(vs) = r.vols.get_mut(&id) {
                vs.size = size;
            }
        });
        if let Some(m) = self.inner.shared.volumes.get(id) {
            m.size.store(size, Ordering::Release);
        }
        Ok(VolumeInfo {
            size,
            ..info_of(&v)
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let c = self.control();
        let mut v: Vec<VolumeInfo> = c
            .state
            .volumes
            .values()
            .filter(|v| v.kind == ImageKind::Volume)
            .map(info_of)
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The volume of that name.
    pub fn volume(&self, name: &str) -> Option<VolumeInfo> {
        self.control().find_volume(name).map(info_of)
    }

    /// Bytes of clusters a volume has allocated.
    pub fn allocated_bytes(&self, id: VolumeId) -> u64 {
        let cs = self.inner.shared.layout.cluster_size;
        self.on_all(move |r| {
            r.vols.get(&id.0).map_or(0, |v| {
                v.shards
                    .values()
                    .map(|s| s.map.allocated().count() as u64)
                    .sum::<u64>()
            })
        })
        .into_iter()
        .sum::<u64>()
            * cs
    }
}

pub(crate) fn check_size(size: u64, block_size: u32) -> Result<(), ControlError> {
    if size == 0 || !size.is_multiple_of(block_size as u64) {
        return Err(ControlError::BadSize(format!(
            "{size} bytes is not a non-zero multiple of the block size {block_size}"
        )));
    }
    if size > crate::MAX_VOLUME_SIZE {
        return Err(ControlError::BadSize(format!(
            "{size} bytes is above the limit of {} bytes",
            crate::MAX_VOLUME_SIZE
        )));
    }
    Ok(())
}

/// The submit path's view of an image; snapshots are named `volume@snapshot`.
pub(crate) fn meta_of(v: &VolumeRecord, of: Option<&str>) -> VolumeMeta {
    let name = match (v.kind, of) {
        (ImageKind::Snapshot, Some(vol)) => format!("{vol}@{}", v.name),
        _ => v.name.clone(),
    };
    VolumeMeta {
        id: v.id,
        name,
        block_size: v.block_size,
        size: AtomicU64::new(v.size),
        read_only: v.kind != ImageKind::Volume,
        deleted: AtomicBool::new(false),
        created_unix: v.created_unix,
    }
}

pub(crate) fn info_of(v: &VolumeRecord) -> VolumeInfo {
    VolumeInfo {
        id: VolumeId(v.id),
        name: v.name.clone(),
        size: v.size,
        block_size: v.block_size,
        created_unix: v.created_unix,
    }
}

pub(crate) fn vol_state(v: &VolumeRecord) -> VolState {
    VolState {
        size: v.size,
        block_size: v.block_size,
        read_only: v.kind != ImageKind::Volume,
        snap_epoch: v.epoch,
        shards: Default::default(),
        inflight: 0,
        writes_inflight: 0,
        deleting: false,
        hold: None,
    }
}
