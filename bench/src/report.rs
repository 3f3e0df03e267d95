//! Statistics of a run (per-thread latency histograms, merged) and how they are shown: a
//! progress line on stderr, a text report or one JSON object on stdout.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Latencies above this (in ns) are clamped into the top bucket.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// What one submitter thread measured.
pub struct Stats {
    /// Completion latency in nanoseconds, submit to poll.
    pub latency: Histogram<u64>,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
}

impl Stats {
    /// Empty statistics.
    pub fn new() -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("histogram bounds"),
            ops: 0,
            bytes: 0,
            errors: 0,
        }
    }

    /// Count one completed request.
    pub fn record(&mut self, latency: Duration, bytes: u64, ok: bool) {
        let ns = (latency.as_nanos() as u64).clamp(1, MAX_LATENCY_NS);
        self.latency.saturating_record(ns);
        self.ops += 1;
        self.bytes += bytes;
        if !ok {
            self.errors += 1;
        }
    }

    /// Add another thread's figures.
    pub fn merge(&mut self, other: &Stats) {
        self.latency
            .add(&other.latency)
            .expect("same histogram bounds");
        self.ops += other.ops;
        self.bytes += other.bytes;
        self.errors += other.errors;
    }
}

/// Latency summary in microseconds.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub min: f64,
    pub avg: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// The result of a run; its JSON form is the stable interface (keys are only ever added).
#[derive(Serialize, Debug, Clone)]
pub struct Report {
    pub workload: String,
    pub bs: u64,
    pub qd: u32,
    pub cores: u32,
    pub seconds: f64,
    pub ops: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub errors: u64,
    pub lat_us: Latency,
    /// Snapshots taken: during the run (--snapshot-every) plus before it (--snapshots-before).
    pub snapshots: u64,
    /// Longest latency (submit to completion, seen by the submitter) of a write that was in
    /// flight while a snapshot create call ran during the run; 0 without --snapshot-every.
    pub snapshot_stall_us_max: u64,
    /// Longest snapshot create call during the run.
    pub snapshot_create_us_max: u64,
    /// The background operation (--background), if any.
    pub background: Option<String>,
    /// How long it ran (to its end, or to the end of the run if unfinished); for `delete`,
    /// until the pool got the snapshot's space back (released in the background).
    pub background_seconds: f64,
    /// How long the operation's call took (`delete`: until it was durable; `inflate`: the
    /// same as `background_seconds`).
    pub background_call_seconds: f64,
    /// Whether it finished during the run.
    pub background_finished: bool,
    /// Foreground IOPS while it ran.
    pub background_iops: f64,
    /// Bytes of in-memory map pages per allocated cluster, after the run.
    pub metadata_bytes_per_cluster: f64,
    /// Polling mode of the reactors.
    pub poll: String,
    /// Device I/Os queued before a mid-pass submit (`--submit-batch`).
    pub submit_batch: u32,
    /// The pool device.
    pub device: String,
}

fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

impl Report {
    /// Summarise merged statistics over `seconds` of measurement.
    pub fn new(base: Report, stats: &Stats) -> Report {
        let h = &stats.latency;
        let us = |ns: u64| round(ns as f64 / 1000.0, 1);
        let seconds = base.seconds.max(1e-9);
        let lat_us = if stats.ops == 0 {
            Latency {
                min: 0.0,
                avg: 0.0,
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            }
        } else {
            Latency {
                min: us(h.min()),
                avg: round(h.mean() / 1000.0, 1),
                p50: us(h.value_at_quantile(0.5)),
                p99: us(h.value_at_quantile(0.99)),
                p999: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
            }
        };
        Report {
            ops: stats.ops,
            errors: stats.errors,
            iops: round(stats.ops as f64 / seconds, 0),
            mib_s: round(stats.bytes as f64 / seconds / (1 << 20) as f64, 1),
            seconds: round(base.seconds, 3),
            lat_us,
            ..base
        }
    }

    /// The human-readable report.
    pub fn text(&self) -> String {
        let l = &self.lat_us;
        let mut extra = String::new();
        if self.snapshots > 0 {
            extra += &format!(
                "snapshots: {} taken, longest write stall {} us, longest create {} us\n",
                self.snapshots, self.snapshot_stall_us_max, self.snapshot_create_us_max
            );
        }
        if let Some(b) = &self.background {
            extra += &format!(
                "background {b}: {:.3}s (call {:.4}s){}, foreground {:.0} IOPS meanwhile\n",
                self.background_seconds,
                self.background_call_seconds,
                if self.background_finished {
                    ""
                } else {
                    " (unfinished)"
                },
                self.background_iops
            );
        }
        let base = format!(
            "{} bs={} qd={} cores={} poll={} submit_batch={} device={}\n\
             {:>12.0} IOPS {:>10.1} MiB/s {:>10} ops in {:.2}s, {} errors\n\
             latency (us): min {:.1} avg {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}\n\
             metadata: {:.1} bytes per allocated cluster\n",
            self.workload,
            self.bs,
            self.qd,
            self.cores,
            self.poll,
            self.submit_batch,
            self.device,
            self.iops,
            self.mib_s,
            self.ops,
            self.seconds,
            self.errors,
            l.min,
            l.avg,
            l.p50,
            l.p99,
            l.p999,
            l.max,
            self.metadata_bytes_per_cluster,
        );
        base + &extra
    }
}

/// Counters the submitter threads bump so that a progress line can be drawn.
#[derive(Default)]
pub struct Progress {
    pub ops: AtomicU64,
    pub bytes: AtomicU64,
    pub errors: AtomicU64,
}

/// Draws a progress line on stderr once a second: rewritten in place (`\r`) on a terminal,
/// one line per second otherwise.
pub struct ProgressLine {
    label: String,
    tty: bool,
    started: Instant,
    last: (Instant, u64, u64),
    drawn: bool,
}

impl ProgressLine {
    /// A progress line for the phase `label`.
    pub fn new(label: &str) -> ProgressLine {
        let now = Instant::now();
        ProgressLine {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            started: now,
            last: (now, 0, 0),
            drawn: false,
        }
    }

    /// Draw the line for the counters now; `total` bytes makes it show a percentage.
    pub fn draw(&mut self, p: &Progress, total: Option<u64>) {
        let now = Instant::now();
        let (ops, bytes) = (
            p.ops.load(Ordering::Relaxed),
            p.bytes.load(Ordering::Relaxed),
        );
        let dt = now.duration_since(self.last.0).as_secs_f64().max(1e-9);
        let iops = (ops - self.last.1) as f64 / dt;
        let mib_s = (bytes - self.last.2) as f64 / dt / (1 << 20) as f64;
        self.last = (now, ops, bytes);
        let done = match total {
            Some(t) if t > 0 => format!(" {:5.1}%", bytes as f64 * 100.0 / t as f64),
            _ => String::new(),
        };
        let line = format!(
            "{} [{:>5.1}s]{done} {:>10.0} IOPS {:>9.1} MiB/s errors {}",
            self.label,
            self.started.elapsed().as_secs_f64(),
            iops,
            mib_s,
            p.errors.load(Ordering::Relaxed)
        );
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = write!(e, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(e, "{line}");
        }
        let _ = e.flush();
        self.drawn = true;
    }

    /// End the line (on a terminal) so later output starts on a fresh one.
    pub fn finish(&self) {
        if self.tty && self.drawn {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Report {
        Report {
            workload: "randread".into(),
            bs: 4096,
            qd: 32,
            cores: 1,
            seconds: 2.0,
            ops: 0,
            iops: 0.0,
            mib_s: 0.0,
            errors: 0,
            lat_us: Latency {
                min: 0.0,
                avg: 0.0,
                p50: 0.0,
                p99: 0.0,
                p999: 0.0,
                max: 0.0,
            },
            snapshots: 0,
            snapshot_stall_us_max: 0,
            snapshot_create_us_max: 0,
            background: None,
            background_seconds: 0.0,
            background_call_seconds: 0.0,
            background_finished: false,
            background_iops: 0.0,
            metadata_bytes_per_cluster: 0.0,
            poll: "adaptive".into(),
            submit_batch: 1,
            device: "null".into(),
        }
    }

    #[test]
    fn report_computes_rates_and_microsecond_latencies() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        for i in 1..=1000u64 {
            a.record(Duration::from_micros(i), 4096, true);
        }
        b.record(Duration::from_micros(5000), 4096, false);
        a.merge(&b);
        let r = Report::new(base(), &a);
        assert_eq!(r.ops, 1001);
        assert_eq!(r.errors, 1);
        assert_eq!(r.iops, 501.0);
        assert!((r.lat_us.p50 - 500.0).abs() < 2.0, "{:?}", r.lat_us);
        assert!((r.lat_us.max - 5000.0).abs() < 10.0, "{:?}", r.lat_us);
        assert_eq!(r.lat_us.min, 1.0);
    }

    #[test]
    fn json_has_the_stable_keys() {
        let r = Report::new(base(), &Stats::new());
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        for k in [
            "workload",
            "bs",
            "qd",
            "cores",
            "seconds",
            "ops",
            "iops",
            "mib_s",
            "errors",
            "snapshots",
            "snapshot_stall_us_max",
            "snapshot_create_us_max",
            "background_seconds",
            "metadata_bytes_per_cluster",
            "submit_batch",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        for k in ["min", "avg", "p50", "p99", "p999", "max"] {
            assert!(v["lat_us"].get(k).is_some(), "missing lat_us.{k}");
        }
    }
}
