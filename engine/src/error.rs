//! Typed errors of the engine, one enum per concern.

use std::fmt;
use std::path::PathBuf;

/// Why an I/O request failed. Targets map these to NBD errno values and SCSI sense data.
/// Serialisable: a barrier participant's answer carries one (`barrier::ToCoordinator`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoError {
    /// The volume id is unknown or the volume was deleted.
    UnknownVolume,
    /// The range ends beyond the volume's size.
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Offset or length is not a multiple of the exported block size.
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    /// A zero-length data request.
    ZeroLength,
    /// The request's buffer is missing or of the wrong length.
    BadBuffer,
    /// A write to a read-only volume (a snapshot).
    ReadOnly,
    /// The pool has no free cluster for a write that needs one.
    NoSpace,
    /// The device returned an error (errno).
    Device(i32),
    /// The engine is shutting down.
    ShuttingDown,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IoError::UnknownVolume => write!(f, "unknown or deleted volume"),
            IoError::OutOfRange { offset, len, size } => {
                write!(f, "range {offset}+{len} ends beyond the volume size {size}")
            }
            IoError::Misaligned {
                offset,
                len,
                block_size,
            } => {
                write!(
                    f,
                    "range {offset}+{len} is not aligned to the block size {block_size}"
                )
            }
            IoError::ZeroLength => write!(f, "zero-length request"),
            IoError::BadBuffer => write!(f, "request buffer missing or of the wrong length"),
            IoError::ReadOnly => write!(f, "volume is read-only"),
            IoError::NoSpace => write!(f, "pool is full"),
            IoError::Device(e) => {
                write!(f, "device error: {}", std::io::Error::from_raw_os_error(*e))
            }
            IoError::ShuttingDown => write!(f, "engine is shutting down"),
        }
    }
}

impl std::error::Error for IoError {}

/// Why a pool could not be formatted or opened.
#[derive(Debug)]
pub enum PoolError {
    /// An OS error on a device, with the device path.
    Io {
        device: PathBuf,
        source: std::io::Error,
    },
    /// The device holds no tessel superblock.
    NotAPool { device: PathBuf },
    /// Both superblock copies fail their checksum.
    BadChecksum { device: PathBuf },
    /// The superblock's format version is not one this build reads.
    UnknownVersion { device: PathBuf, version: u32 },
    /// The device already holds a pool or a filesystem; formatting needs `force`.
    InUse { device: PathBuf, what: String },
    /// The devices given do not form one pool (missing, foreign or duplicated member).
    Membership { device: PathBuf, reason: String },
    /// A geometry parameter is out of range.
    Geometry(String),
    /// The metadata on the pool is inconsistent and was not repaired.
    Corrupt(String),
    /// Another process holds the pool open.
    Locked { device: PathBuf },
    /// A block device is opened exclusively elsewhere: another tessel (perhaps through
    /// another device node of the same device) or a mounted filesystem.
    Busy { device: PathBuf },
    /// The device's logical sector is larger than a pool can align its I/O to.
    SectorSize { device: PathBuf, sector: u32 },
    /// A metadata block recovery needs is damaged while blocks written after it are
    /// intact: opening would silently drop them. `tessel pool salvage` opens it anyway.
    Damaged { device: PathBuf, damage: Damage },
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Io { device, source } => write!(f, "{}: {source}", device.display()),
            PoolError::NotAPool { device } => {
                write!(f, "{}: not a tessel pool (no superblock)", device.display())
            }
            PoolError::BadChecksum { device } => {
                write!(
                    f,
                    "{}: tessel superblock checksum mismatch in both copies",
                    device.display()
                )
            }
            PoolError::UnknownVersion { device, version } => write!(
                f,
                "{}: tessel pool format version {version} is not supported by this build",
                device.display()
            ),
            PoolError::InUse { device, what } => write!(
                f,
                "{}: device holds {what}; refusing to format without --force",
                device.display()
            ),
            PoolError::Membership { device, reason } => write!(f, "{}: {reason}", device.display()),
            PoolError::Geometry(s) => write!(f, "invalid pool geometry: {s}"),
            PoolError::Corrupt(s) => write!(f, "pool metadata is inconsistent: {s}"),
            PoolError::Locked { device } => {
                write!(f, "{}: pool is in use by another process", device.display())
            }
            PoolError::Busy { device } => write!(
                f,
                "{}: block device is in use (opened exclusively by another process, perhaps through another device node, or mounted)",
                device.display()
            ),
            PoolError::SectorSize { device, sector } => write!(
                f,
                "{}: device sector size {sector} is not supported (a pool needs a power of two up to 4096 bytes)",
                device.display()
            ),
            PoolError::Damaged { device, damage } => write!(
                f,
                "{}: pool metadata is damaged: {damage}; refusing to open (`tessel pool salvage` opens it without them and reports what it drops)",
                device.display()
            ),
        }
    }
}

impl PoolError {
    /// The errno a device error carries (EIO for errors that are not the OS's), for the
    /// data path, which reports errno values to hosts.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }
}

impl std::error::Error for PoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PoolError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why a control operation (volume, snapshot, clone management) failed.
#[derive(Debug)]
pub enum ControlError {
    /// No volume of that name.
    UnknownVolume(String),
    /// No snapshot of that name on the volume.
    UnknownSnapshot { volume: String, snapshot: String },
    /// The name is taken.
    Exists(String),
    /// The name is empty, too long or holds characters outside [A-Za-z0-9._-].
    BadName(String),
    /// A size is zero, not a multiple of the block size, too large, or a shrink.
    BadSize(String),
    /// The block size is not 512 or 4096.
    BadBlockSize(u32),
    /// The operation needs something that other objects still use (names them).
    InUse(String),
    /// The snapshot (`volume@snapshot`) is protected from deletion.
    Protected(String),
    /// A write-path error while making the change durable.
    Io(IoError),
    /// The pool refused the change.
    Pool(PoolError),
    /// The snapshot barrier did not complete in time; nothing was frozen.
    BarrierTimeout,
    /// The engine is shutting down.
    ShuttingDown,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::UnknownVolume(v) => write!(f, "unknown volume '{v}'"),
            ControlError::UnknownSnapshot { volume, snapshot } => {
                write!(f, "volume '{volume}' has no snapshot '{snapshot}'")
            }
            ControlError::Exists(n) => write!(f, "'{n}' already exists"),
            ControlError::BadName(n) => {
                write!(f, "invalid name '{n}': use {}", crate::name::NAME_RULE)
            }
            ControlError::BadSize(s) => write!(f, "invalid size: {s}"),
            ControlError::BadBlockSize(b) => write!(f, "invalid block size {b}: use 512 or 4096"),
            ControlError::InUse(s) => write!(f, "in use: {s}"),
            ControlError::Protected(s) => {
                write!(f, "snapshot '{s}' is protected; unprotect it first")
            }
            ControlError::Io(e) => write!(f, "{e}"),
            ControlError::Pool(e) => write!(f, "{e}"),
            ControlError::BarrierTimeout => {
                write!(f, "snapshot barrier timed out; no snapshot was taken")
            }
            ControlError::ShuttingDown => write!(f, "engine is shutting down"),
        }
    }
}

impl std::error::Error for ControlError {}

impl From<PoolError> for ControlError {
    fn from(e: PoolError) -> Self {
        ControlError::Pool(e)
    }
}

impl From<IoError> for ControlError {
    fn from(e: IoError) -> Self {
        ControlError::Io(e)
    }
}

/// A metadata ring: the control log or one reactor's journal region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ring {
    ControlLog,
    Journal(u32),
}

impl std::fmt::Display for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ring::ControlLog => write!(f, "control log"),
            Ring::Journal(r) => write!(f, "journal region {r}"),
        }
    }
}

/// A block of a ring that recovery needs and cannot read, found because blocks written
/// after it was durable are intact: corruption, not a torn tail. Replay cannot go past it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub ring: Ring,
    /// Sequence number of the first block that does not open.
    pub seq: u64,
    /// Its byte offset on member 0.
    pub offset: u64,
    /// Intact blocks of the run found after it (their records are not replayed).
    pub blocks_after: u64,
    /// Records in those blocks.
    pub records_after: u64,
    /// Sequence number of the last of them.
    pub last_seq: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} block {} (byte offset {}) is damaged; {} intact blocks after it (up to sequence {}, {} records) cannot be replayed",
            self.ring, self.seq, self.offset, self.blocks_after, self.last_seq, self.records_after
        )
    }
}
