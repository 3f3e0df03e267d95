//! tessel-engine: pools, reactors on io_uring, shard maps, journal, snapshots.
//!
//! DESIGN.md (shared) is the specification; docs/architecture.md says how this crate
//! implements it. The public surface: `Engine` (open a pool, manage volumes, clients),
//! `Client` (submit `Request`s from a thread), `Poller` (tasks hosted on a reactor).

pub mod alloc;
pub(crate) mod backend;
pub mod barrier;
pub mod buf;
mod control;
pub mod coordinator;
mod datapath;
mod dispatch;
pub mod engine;
pub mod error;
pub mod format;
pub mod io;
pub mod journal;
pub mod layout;
mod lifecycle;
pub mod map;
pub mod media;
mod name;
pub mod pool;
mod rangelock;
pub mod reactor;
pub mod request;
mod slab;
mod snapshot;
pub mod volume;

pub use buf::{AlignedBuf, BufPool};
pub use coordinator::{InflateProgress, SnapshotInfo};
pub use engine::{
    avoid_huge_page_faults, percentile_us, valid_name, Client, CoreCounters, Engine, EngineConfig,
    PoolInfo, VolumeInfo, NAME_RULE,
};
pub use error::{ControlError, IoError, PoolError};
pub use format::FormatOptions;
pub use io::{Completion, Extent, Op, Request, VolumeId};
pub use media::{DeviceSpec, Fault, FaultOp, MemDisk};
pub use reactor::{PollCtx, PollMode, Poller};
pub use slab::Slab;

/// Largest volume size accepted (64 TiB).
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
