//! Command-line arguments of tessel-bench, and the size syntax they use ("4G", "128k").

use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// The in-process workload runner for tessel (bdevperf for tessel): opens a pool, creates a
/// test volume and drives it through the engine's request API, without any target.
#[derive(Parser, Debug, Clone)]
#[command(name = "tessel-bench", version)]
pub struct Args {
    /// Pool device: a file (created sparse if missing) or block device path, `null` (no device
    /// I/O: measures the engine alone) or `mem` (an in-memory disk). `null` and `mem` are
    /// always formatted fresh.
    #[arg(long, short = 'd')]
    pub device: String,

    /// Format the device before the run (destroys a pool on it). Without it, a device with no
    /// signature is formatted, an existing pool is opened and its volume `bench` reused.
    #[arg(long)]
    pub format: bool,

    /// With --format: overwrite a device that holds a pool or a filesystem signature.
    #[arg(long, requires = "format")]
    pub force: bool,

    /// Size of the test volume (K, M, G, T suffixes, powers of 1024).
    #[arg(long, short = 's', default_value = "4G", value_parser = parse_size)]
    pub size: u64,

    /// What to run; `verify` writes a self-checking pattern over the whole range once, reads it
    /// back and fails on any mismatch (it ignores --time).
    #[arg(long, short = 'w', value_enum, default_value_t = Workload::Randread)]
    pub workload: Workload,

    /// Request size (a multiple of 512 bytes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,

    /// Requests each job keeps in flight (like fio's iodepth per job).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,

    /// Reactors (one pinned poller thread each, on CPUs 0..N) and jobs (one per reactor; see
    /// --driver for where they run).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub cores: u32,

    /// Seconds to measure (after any prefill).
    #[arg(long, short = 't', default_value_t = 10.0)]
    pub time: f64,

    /// Percentage of reads in `randrw`.
    #[arg(long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmix: u8,

    /// Write the whole test range first so that reads reach the device (default: on for
    /// read, randread and randrw; off otherwise).
    #[arg(long, overrides_with = "no_prefill")]
    pub prefill: bool,

    /// Skip the prefill.
    #[arg(long, overrides_with = "prefill")]
    pub no_prefill: bool,

    /// Who runs the jobs: `reactor` hosts job N as a poller on reactor N (no thread hop,
    /// the way a target connection is served); `thread` runs each job on a submitter thread
    /// of its own that talks to the reactors through a Client (the path of an application
    /// linking the engine).
    #[arg(long, value_enum, default_value_t = Driver::Reactor)]
    pub driver: Driver,

    /// How idle reactors wait: busy (spin, lowest latency) or adaptive (spin briefly, then
    /// sleep until woken).
    #[arg(long, value_enum, default_value_t = Poll::Adaptive)]
    pub poll: Poll,

    /// Device I/Os a reactor queues before it enters the kernel to submit them (the rest go
    /// at the end of its pass). 1 submits each at once, like fio's default; larger values
    /// save syscalls where the device prefers batches (like fio's iodepth_batch_submit).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub submit_batch: u32,

    /// Print one JSON object on stdout instead of the text report.
    #[arg(long)]
    pub json: bool,

    /// Size of the pool device when the bench creates it (a missing file, null, mem);
    /// default: the volume plus 1/8 plus 512 MiB. Snapshots under a write load keep the old
    /// clusters, so give them room (a sparse file costs only what is written).
    #[arg(long, value_parser = parse_size)]
    pub pool_size: Option<u64>,

    /// Cluster size used when formatting (4K to 1M, a power of two).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub cluster_size: u64,

    /// Seed of the random offsets (xorshift), for reproducible runs.
    #[arg(long, default_value_t = 0x7e55e1)]
    pub seed: u64,

    /// With the prefill: write only the first SIZE bytes of the volume (a thin volume with
    /// that much written), not all of it.
    #[arg(long, value_parser = parse_size)]
    pub prefill_size: Option<u64>,

    /// While measuring, a separate thread snapshots the test volume every DURATION (500ms,
    /// 1s, ...; names bench-0, bench-1, ...). The report then holds `snapshot_stall_us_max`:
    /// the longest latency, submit to completion as the submitter sees it, of a write that was
    /// in flight while a create call ran (submitted before the call returned and completed
    /// after it started), and `snapshot_create_us_max`, the longest create call.
    #[arg(long, value_parser = crate::snap::parse_duration)]
    pub snapshot_every: Option<Duration>,

    /// Before measuring (after any prefill), take N snapshots (pre-0, pre-1, ...) with
    /// --writes-between random writes of --bs spread over the volume before each.
    #[arg(long, default_value_t = 0)]
    pub snapshots_before: u32,

    /// Random writes before each of the --snapshots-before snapshots.
    #[arg(long, default_value_t = 16)]
    pub writes_between: u32,

    /// While measuring, run a background operation in a thread: `inflate` inflates a clone of
    /// a snapshot of the (prefilled) volume; `delete` deletes a snapshot whose every cluster
    /// the volume has overwritten since (all of them exclusively its own). The state is set
    /// up before measuring; `background_seconds` is how long the operation ran (for
    /// `delete`, until the pool got the snapshot's space back: the call returns once the
    /// delete is durable, `background_call_seconds`, and the clusters are released after).
    #[arg(long, value_enum)]
    pub background: Option<Background>,

    /// With --background: set up the same state but do not start the operation (the idle
    /// baseline of the same volume).
    #[arg(long, requires = "background")]
    pub background_idle: bool,
}

/// Background operations run while measuring.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Background {
    Inflate,
    Delete,
}

/// The workloads.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Randread,
    Randwrite,
    Read,
    Write,
    Randrw,
    Verify,
}

impl Workload {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randrw => "randrw",
            Workload::Verify => "verify",
        }
    }

    /// True when the workload reads data it did not write itself in this run.
    pub fn reads_prior_data(self) -> bool {
        matches!(self, Workload::Randread | Workload::Read | Workload::Randrw)
    }
}

/// Who runs the workload's jobs.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    /// A poller on each reactor submits and completes on the reactor's own thread, as a
    /// target connection does (SPDK bdevperf's model).
    Reactor,
    /// A submitter thread per job with its own engine Client, pinned after the reactors'
    /// CPUs when there are enough: every request crosses threads twice.
    Thread,
}

/// Reactor polling mode, as given on the command line.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    Busy,
    Adaptive,
}

/// Where the pool lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Path(PathBuf),
    Null,
    Mem,
}

impl Args {
    /// The device named by --device.
    pub fn device(&self) -> Device {
        match self.device.as_str() {
            "null" => Device::Null,
            "mem" => Device::Mem,
            p => Device::Path(PathBuf::from(p)),
        }
    }

    /// Whether to prefill: explicit flags win (--prefill-size asks for one), else on for
    /// workloads that read prior data.
    pub fn prefill(&self) -> bool {
        if self.prefill || (self.prefill_size.is_some() && !self.no_prefill) {
            true
        } else if self.no_prefill {
            false
        } else {
            self.workload.reads_prior_data()
        }
    }

    /// Exported block size of the test volume: 4096 unless requests are smaller.
    pub fn block_size(&self) -> u32 {
        if self.bs.is_multiple_of(4096) {
            4096
        } else {
            512
        }
    }

    /// Check what clap cannot: sizes that must line up.
    pub fn validate(&self) -> Result<(), String> {
        if self.bs == 0 || !self.bs.is_multiple_of(512) {
            return Err(format!("--bs {} is not a multiple of 512", self.bs));
        }
        if self.bs > 64 << 20 {
            return Err(format!("--bs {} is above 64 MiB", self.bs));
        }
        let unit = self.bs * self.cores as u64;
        if self.size < unit || !self.size.is_multiple_of(self.bs) {
            return Err(format!(
                "--size {} must be a multiple of --bs {} and hold at least one request per core",
                self.size, self.bs
            ));
        }
        if let Some(p) = self.prefill_size {
            if p == 0 || p > self.size || p % self.bs != 0 {
                return Err(format!(
                    "--prefill-size {p} must be a non-zero multiple of --bs {} up to --size",
                    self.bs
                ));
            }
        }
        if !(self.time > 0.0 && self.time.is_finite()) {
            return Err(format!("--time {} must be a positive number", self.time));
        }
        Ok(())
    }
}

/// Parse "4096", "4k", "64K", "1.5G", "4GiB" (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match digits.chars().last() {
        Some('k') => (&digits[..digits.len() - 1], 1u64 << 10),
        Some('m') => (&digits[..digits.len() - 1], 1 << 20),
        Some('g') => (&digits[..digits.len() - 1], 1 << 30),
        Some('t') => (&digits[..digits.len() - 1], 1 << 40),
        _ => (digits, 1),
    };
    let bad = || format!("{s:?} is not a size (examples: 4096, 4k, 64K, 4G)");
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(bad);
    }
    let f: f64 = num.parse().map_err(|_| bad())?;
    let v = f * mult as f64;
    if !(v >= 0.0 && v < u64::MAX as f64) || v.fract() != 0.0 {
        return Err(bad());
    }
    Ok(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("x").is_err());
        assert!(parse_size("0.3k").is_err());
    }

    #[test]
    fn prefill_defaults_to_read_workloads_and_flags_override() {
        let a = Args::parse_from(["b", "--device", "null", "--workload", "randread"]);
        assert!(a.prefill());
        let a = Args::parse_from(["b", "--device", "null", "--workload", "randwrite"]);
        assert!(!a.prefill());
        let a = Args::parse_from(["b", "-d", "null", "-w", "randwrite", "--prefill"]);
        assert!(a.prefill());
        let a = Args::parse_from(["b", "-d", "null", "-w", "read", "--no-prefill"]);
        assert!(!a.prefill());
    }

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }
}
