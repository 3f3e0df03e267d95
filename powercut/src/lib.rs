//! A power-cut harness for tessel's real I/O path: a FUSE filesystem ("powercut fs") that
//! holds pool files and behaves like a disk with a volatile write cache.
//!
//! `tessel serve` opens a pool file O_DIRECT and drives it through io_uring, so each of its
//! writes, fsyncs and fdatasyncs reaches this filesystem as one FUSE request, in the order the
//! kernel sends them (one thread answers them all, so that order is exact). The filesystem
//! keeps two images: what a reader sees now, and what survives a power cut
//! ([`Recorder`]). A write is volatile until an fsync of its file completes, or durable at
//! once when it carries O_DSYNC (RWF_DSYNC, tessel's FUA path). At a power cut
//! ([`Mounted::power_cut`]) every later request fails with EIO, and the crash image is the
//! durable image plus a seeded random subset of the volatile writes, some of them torn at
//! 4 KiB: the same rule as the engine's in-memory crash simulator (engine/src/media.rs).
//!
//! File metadata (names, sizes) is durable at once: a real filesystem journals it, and the
//! subject under test is tessel's ordering of data and journal writes, not the host's.

mod fs;
mod image;

pub use fs::Mounted;
pub use image::{CrashReport, Disk, Recorder, SplitMix, Stats, TEAR};
