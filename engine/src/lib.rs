//! tessel-engine: pools, reactors on io_uring, shard maps, journal, snapshots.
//!
//! See DESIGN.md (shared) and docs/architecture.md for the ownership rules.

pub mod buf;
pub mod error;
pub mod io;

pub use buf::AlignedBuf;
pub use error::{ControlError, IoError, PoolError};
pub use io::{Completion, Extent, Op, Request, VolumeId};
