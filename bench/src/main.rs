//! tessel-bench: the in-process workload runner (bdevperf for tessel). It opens a pool on a
//! file, block device, memory or the null device, creates the volume `bench` and drives it
//! through the engine's request API.
//!
//! Load model: `--cores N` starts N reactors and N jobs, and each job keeps `--qd` requests in
//! flight (like fio's `iodepth` per job, with `numjobs=N`), so the total queue depth is
//! N × qd. By default job N is a poller on reactor N (as SPDK's bdevperf runs its jobs, and
//! as a target connection is served), so one core does both the workload and the engine's
//! work, the way fio's one job does both; `--driver thread` runs each job on a submitter
//! thread of its own with an engine `Client` instead (see worker.rs).

mod args;
mod report;
mod snap;
mod worker;
mod workload;

use args::{Args, Background, Device, Driver, Poll, Workload};
use clap::Parser;
use report::{Progress, ProgressLine, Report, Stats};
use snap::Windows;
use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};
use tessel_engine::{
    AlignedBuf, DeviceSpec, Engine, EngineConfig, FormatOptions, MemDisk, Op, PollMode, PoolError,
    Request, VolumeId,
};
use worker::{Data, Finished, JobPoller, Outcome, Pass, Worker};
use workload::{Generator, Kind, Pattern, XorShift};

/// The volume every run uses.
const VOLUME: &str = "bench";
/// Prefill request size.
const PREFILL_BS: u64 = 1 << 20;
/// Mismatches printed in full by `verify`; the rest are counted.
const MISMATCHES_SHOWN: usize = 20;

fn main() -> ExitCode {
    tessel_engine::avoid_huge_page_faults();
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = args.validate() {
        eprintln!("tessel-bench: {e}");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tessel-bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Run the benchmark; Ok(false) when a request failed or `verify` found a mismatch.
fn run(args: &Args) -> Result<bool, String> {
    let engine = open_engine(args)?;
    let vol = test_volume(&engine, args)?;
    let threads = args.cores as usize;
    if args.prefill() {
        let seconds = fill(
            &engine,
            vol,
            args,
            args.prefill_size.unwrap_or(args.size),
            "prefill",
        )?;
        tracing::info!(seconds, "prefill done");
    }
    let before = if args.snapshots_before > 0 {
        snapshots_before(&engine, vol, args)?
    } else {
        0
    };
    let bg_plan = match args.background {
        Some(kind) => Some(background_setup(&engine, vol, args, kind)?),
        None => None,
    };
    if args.prefill() || before > 0 || bg_plan.is_some() {
        // Make the setup durable now, so that the first flush of the measured pass (a
        // snapshot's commit, say) does not pay for it.
        let t = Instant::now();
        let c = engine.client().run(request(0, vol, Op::Flush, 0, 0, None));
        c.result
            .map_err(|e| format!("flush after the setup: {e}"))?;
        tracing::info!(seconds = t.elapsed().as_secs_f64(), "setup flushed");
    }
    let windows = Arc::new(Windows::new(Instant::now()));
    let snaps = SnapLoad::default();
    let bg = BgResult::default();
    let out = match args.workload {
        Workload::Verify => verify(&engine, vol, args),
        w => {
            let pass = Pass {
                label: w.name(),
                qd: args.qd,
                deadline: Some(Duration::from_secs_f64(args.time)),
                data: Data::Filler,
                windows: args.snapshot_every.map(|_| windows.clone()),
            };
            let snapshotter = |ctx: &SideCtx| {
                if let Some(every) = args.snapshot_every {
                    snapshot_every(&engine, every, &windows, &snaps, ctx);
                }
            };
            let background = |ctx: &SideCtx| {
                if let (Some(plan), false) = (&bg_plan, args.background_idle) {
                    background_run(&engine, plan, args, &bg, ctx);
                }
            };
            let sides: [&(dyn Fn(&SideCtx) + Sync); 2] = [&snapshotter, &background];
            drive(&engine, vol, threads, args.driver, &pass, &sides, |t| {
                Generator::timed(w, args.size, args.bs, args.rwmix, args.seed, t, threads)
            })
        }
    };
    let snaps = snaps.0.into_inner().unwrap_or_else(|e| e.into_inner());
    let bg = bg.0.into_inner().unwrap_or_else(|e| e.into_inner());
    if snaps.errors > 0 {
        eprintln!("tessel-bench: {} snapshot creates failed", snaps.errors);
    }
    let (page_bytes, clusters) = engine.map_memory();
    engine
        .shutdown()
        .map_err(|e| format!("engine shutdown: {e}"))?;
    let mut stats = out.stats;
    stats.errors += out.mismatches.len() as u64;
    let base = Report {
        workload: args.workload.name().into(),
        bs: args.bs,
        qd: args.qd,
        cores: args.cores,
        seconds: out.seconds,
        ops: 0,
        iops: 0.0,
        mib_s: 0.0,
        errors: 0,
        lat_us: report::Latency {
            min: 0.0,
            avg: 0.0,
            p50: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
        },
        snapshots: before + snaps.taken,
        snapshot_stall_us_max: out.stall_ns.div_ceil(1000),
        snapshot_create_us_max: snaps.create_ns_max.div_ceil(1000),
        background: args.background.map(|b| {
            let name = format!("{b:?}").to_lowercase();
            if args.background_idle {
                format!("{name} (idle: set up, not started)")
            } else {
                name
            }
        }),
        background_seconds: (bg.seconds * 1000.0).round() / 1000.0,
        background_call_seconds: (bg.call_seconds * 1e6).round() / 1e6,
        background_finished: bg.finished,
        background_iops: bg.iops.round(),
        metadata_bytes_per_cluster: if clusters == 0 {
            0.0
        } else {
            (page_bytes as f64 / clusters as f64 * 10.0).round() / 10.0
        },
        poll: format!("{:?}", args.poll).to_lowercase(),
        submit_batch: args.submit_batch,
        device: args.device.clone(),
    };
    let report = Report::new(base, &stats);
    for m in out.mismatches.iter().take(MISMATCHES_SHOWN) {
        eprintln!("verify: LBA {}: {}", m.lba, m.what);
    }
    if out.mismatches.len() > MISMATCHES_SHOWN {
        eprintln!(
            "verify: {} more mismatching blocks",
            out.mismatches.len() - MISMATCHES_SHOWN
        );
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report.text());
    }
    Ok(report.errors == 0 && snaps.errors == 0 && bg.error.is_none())
}

/// Write the first `bytes` of the volume once, in large requests.
fn fill(
    engine: &Engine,
    vol: VolumeId,
    args: &Args,
    bytes: u64,
    label: &'static str,
) -> Result<f64, String> {
    let threads = args.cores as usize;
    let bs = PREFILL_BS.max(args.bs);
    let pass = Pass {
        label,
        qd: args.qd.min(8),
        deadline: None,
        data: Data::Filler,
        windows: None,
    };
    let out = drive(engine, vol, threads, args.driver, &pass, &[], |t| {
        Generator::once(Kind::Write, bytes, bs, t, threads)
    });
    if out.stats.errors > 0 {
        return Err(format!("{label}: {} writes failed", out.stats.errors));
    }
    Ok(out.seconds)
}

/// `prefix-N` for the first N from `from` that the volume has no snapshot of that name.
fn free_name(taken: &HashSet<String>, prefix: &str, from: &mut u64) -> String {
    loop {
        let n = format!("{prefix}-{from}");
        *from += 1;
        if !taken.contains(&n) {
            return n;
        }
    }
}

/// --snapshots-before: N snapshots, each after a few random writes spread over the volume.
fn snapshots_before(engine: &Engine, vol: VolumeId, args: &Args) -> Result<u64, String> {
    let taken: HashSet<String> = engine.snapshot_names(VOLUME).into_iter().collect();
    let mut client = engine.client();
    let mut rng = XorShift::new(args.seed ^ 0x5a4e);
    let mut buf = Some(AlignedBuf::zeroed(args.bs as usize));
    let units = args.size / args.bs;
    let began = Instant::now();
    let (mut longest, mut next) = (Duration::ZERO, 0);
    for i in 0..args.snapshots_before {
        for _ in 0..args.writes_between {
            let off = rng.below(units) * args.bs;
            let b = buf.take().expect("buffer back");
            let op = Op::Write { fua: false };
            let c = client.run(request(0, vol, op, off, args.bs, Some(b)));
            c.result
                .map_err(|e| format!("write before snapshot {i}: {e}"))?;
            buf = Some(
                c.buf
                    .unwrap_or_else(|| AlignedBuf::zeroed(args.bs as usize)),
            );
        }
        let name = free_name(&taken, "pre", &mut next);
        let t = Instant::now();
        engine
            .snapshot_create(VOLUME, &name)
            .map_err(|e| format!("snapshot {name}: {e}"))?;
        longest = longest.max(t.elapsed());
    }
    eprintln!(
        "snapshots-before: {} taken in {:.2}s, longest create {} us",
        args.snapshots_before,
        began.elapsed().as_secs_f64(),
        longest.as_micros()
    );
    Ok(args.snapshots_before as u64)
}

/// Snapshots taken while measuring.
#[derive(Default)]
struct SnapLoad(Mutex<SnapCounts>);

#[derive(Default)]
struct SnapCounts {
    taken: u64,
    errors: u64,
    create_ns_max: u64,
}

/// What a side thread of a pass sees.
#[derive(Clone, Copy)]
struct SideCtx<'a> {
    began: Instant,
    /// When the submitters stop issuing.
    end: Option<Instant>,
    /// Set once every submitter is done.
    stop: &'a AtomicBool,
    progress: &'a Progress,
}

impl SideCtx<'_> {
    /// Sleep until `t`; false when the pass ended first.
    fn sleep_until(&self, t: Instant) -> bool {
        loop {
            if self.stop.load(Ordering::Acquire) || self.end.is_some_and(|e| Instant::now() >= e) {
                return false;
            }
            let now = Instant::now();
            if now >= t {
                return true;
            }
            std::thread::sleep((t - now).min(Duration::from_millis(1)));
        }
    }
}

/// --snapshot-every: snapshot the volume every `every` until the pass ends; each create call
/// is a window for the stall computation.
fn snapshot_every(
    engine: &Engine,
    every: Duration,
    windows: &Windows,
    load: &SnapLoad,
    ctx: &SideCtx,
) {
    let taken: HashSet<String> = engine.snapshot_names(VOLUME).into_iter().collect();
    let mut n = 0;
    let mut next = ctx.began + every;
    while ctx.sleep_until(next) {
        let name = free_name(&taken, "bench", &mut n);
        let a = windows.open();
        let t = Instant::now();
        let r = engine.snapshot_create(VOLUME, &name);
        let took = t.elapsed();
        windows.close(a);
        let mut l = load.0.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(_) => {
                l.taken += 1;
                l.create_ns_max = l.create_ns_max.max(took.as_nanos() as u64);
            }
            Err(e) => {
                l.errors += 1;
                tracing::error!("snapshot {name}: {e}");
            }
        }
        next += every;
    }
}

/// The state a background operation works on, made before measuring.
enum BgPlan {
    /// Inflate this clone (of a snapshot of the prefilled volume).
    Inflate { clone: String },
    /// Delete this snapshot, all of whose clusters the volume has overwritten since;
    /// `exclusive` bytes are its own (what the pool gets back).
    Delete { snapshot: String, exclusive: u64 },
}

/// What the background operation did.
#[derive(Default)]
struct BgResult(Mutex<BgCounts>);

#[derive(Default)]
struct BgCounts {
    seconds: f64,
    call_seconds: f64,
    finished: bool,
    iops: f64,
    error: Option<String>,
}

/// Build the state --background works on (needs a prefilled volume).
fn background_setup(
    engine: &Engine,
    vol: VolumeId,
    args: &Args,
    kind: Background,
) -> Result<BgPlan, String> {
    if !args.prefill() {
        return Err("--background needs a prefilled volume (add --prefill)".into());
    }
    let taken: HashSet<String> = engine.snapshot_names(VOLUME).into_iter().collect();
    let mut n = 0;
    let snapshot = free_name(&taken, "bg", &mut n);
    engine
        .snapshot_create(VOLUME, &snapshot)
        .map_err(|e| format!("snapshot {snapshot}: {e}"))?;
    match kind {
        Background::Inflate => {
            let mut n = 0;
            let clone = loop {
                let c = format!("bench-clone-{n}");
                n += 1;
                if engine.volume(&c).is_none() {
                    break c;
                }
            };
            engine
                .clone_create(VOLUME, &snapshot, &clone)
                .map_err(|e| format!("clone {clone}: {e}"))?;
            Ok(BgPlan::Inflate { clone })
        }
        Background::Delete => {
            // Overwrite what the prefill wrote: every cluster moves to a new one and the
            // snapshot ends up owning all the old ones alone.
            let bytes = args.prefill_size.unwrap_or(args.size);
            let seconds = fill(engine, vol, args, bytes, "overwrite")?;
            tracing::info!(seconds, "overwrite after the snapshot done");
            let exclusive = engine
                .snapshots(Some(VOLUME))
                .map_err(|e| format!("list snapshots: {e}"))?
                .into_iter()
                .find(|s| s.name == snapshot)
                .map_or(0, |s| s.exclusive_bytes);
            Ok(BgPlan::Delete {
                snapshot,
                exclusive,
            })
        }
    }
}

/// Run the background operation, starting 1 s into the pass (or a fifth of --time if that
/// is shorter), and record how long it ran and the foreground IOPS meanwhile.
fn background_run(engine: &Engine, plan: &BgPlan, args: &Args, out: &BgResult, ctx: &SideCtx) {
    let delay = Duration::from_secs_f64((args.time / 5.0).min(1.0));
    if !ctx.sleep_until(ctx.began + delay) {
        return;
    }
    let t = Instant::now();
    let ops0 = ctx.progress.ops.load(Ordering::Relaxed);
    let mut call = None;
    let (finished, error) = match plan {
        BgPlan::Delete {
            snapshot,
            exclusive,
        } => {
            let used0 = engine.pool_info().used_bytes;
            match engine.snapshot_delete(VOLUME, snapshot) {
                Err(e) => (false, Some(format!("delete {snapshot}: {e}"))),
                Ok(()) => {
                    call = Some(t.elapsed());
                    // The delete is durable when the call returns; its clusters are
                    // released in the background after it: that counts too. The
                    // foreground only overwrites its own clusters, so the used space
                    // drops by the snapshot's own bytes once the release is done.
                    let gone = used0.saturating_sub(*exclusive);
                    loop {
                        if engine.pool_info().used_bytes <= gone {
                            break (true, None);
                        }
                        if !ctx.sleep_until(Instant::now() + Duration::from_millis(1)) {
                            break (false, None);
                        }
                    }
                }
            }
        }
        BgPlan::Inflate { clone } => match engine.clone_inflate(clone) {
            Err(e) => (false, Some(format!("inflate {clone}: {e}"))),
            Ok(mut p) => loop {
                if p.finished {
                    break (true, None);
                }
                if !ctx.sleep_until(Instant::now() + Duration::from_millis(10)) {
                    break (false, None);
                }
                match engine.inflate_progress(clone) {
                    Ok(q) => p = q,
                    Err(e) => break (false, Some(format!("inflate {clone}: {e}"))),
                }
            },
        },
    };
    // Count the foreground over the operation's time within the pass only.
    let end = ctx.end.map_or(Instant::now(), |e| e.min(Instant::now()));
    let ops = ctx.progress.ops.load(Ordering::Relaxed) - ops0;
    let seconds = t.elapsed().as_secs_f64();
    let call_seconds = call.map_or(seconds, |c| c.as_secs_f64());
    let inside = end.saturating_duration_since(t).as_secs_f64();
    if let Some(e) = &error {
        tracing::error!("background: {e}");
    }
    *out.0.lock().unwrap_or_else(|e| e.into_inner()) = BgCounts {
        seconds,
        call_seconds,
        finished,
        iops: if inside > 0.0 {
            ops as f64 / inside
        } else {
            0.0
        },
        error,
    };
}

/// Bytes a file or null device needs for a volume of `size` plus pool metadata.
fn device_bytes(size: u64) -> u64 {
    size + size / 8 + (512 << 20)
}

/// Format (when asked, or when the device holds nothing) and open the pool.
fn open_engine(args: &Args) -> Result<Engine, String> {
    let n = args.cores as usize;
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let cfg = EngineConfig {
        cores: (0..n).map(|i| i % cpus).collect(),
        poll: match args.poll {
            Poll::Busy => PollMode::Busy,
            Poll::Adaptive => PollMode::Adaptive,
        },
        ring_entries: 256u32.max((args.qd * 2).next_power_of_two()),
        submit_batch: args.submit_batch,
        ..EngineConfig::default()
    };
    let mut opts = FormatOptions {
        cluster_size: u32::try_from(args.cluster_size)
            .map_err(|_| format!("--cluster-size {} is too large", args.cluster_size))?,
        force: args.force,
        ..FormatOptions::default()
    };
    opts.journal_regions = opts.journal_regions.max(args.cores);
    let size = args.pool_size.unwrap_or(device_bytes(args.size));
    let (spec, fresh) = match args.device() {
        Device::Null => (DeviceSpec::null(size), true),
        Device::Mem => (DeviceSpec::Mem(MemDisk::new(size, false)), true),
        Device::Path(path) => (
            DeviceSpec::Path {
                path,
                create_size: Some(size),
            },
            args.format,
        ),
    };
    let dev = [spec];
    let err = |what: &str, e: PoolError| format!("{what} {}: {e}", args.device);
    if fresh {
        opts.force |= matches!(args.device(), Device::Null | Device::Mem);
        Engine::format(&dev, &opts).map_err(|e| err("format", e))?;
        tracing::info!(device = %args.device, "pool formatted");
    }
    match Engine::open(&dev, cfg.clone()) {
        Ok(e) => Ok(e),
        Err(PoolError::NotAPool { .. }) if !fresh => {
            // A blank device: formatting refuses by itself if it finds a filesystem.
            Engine::format(&dev, &opts).map_err(|e| err("format", e))?;
            tracing::info!(device = %args.device, "blank device formatted");
            Engine::open(&dev, cfg).map_err(|e| err("open", e))
        }
        Err(e) => Err(err("open", e)),
    }
}

/// Create the volume `bench`, or reuse it (grown to --size if smaller).
fn test_volume(engine: &Engine, args: &Args) -> Result<VolumeId, String> {
    let info = match engine.volume(VOLUME) {
        None => engine
            .create_volume(VOLUME, args.size, args.block_size())
            .map_err(|e| format!("create volume {VOLUME}: {e}"))?,
        Some(v) if v.size < args.size => engine
            .resize_volume(VOLUME, args.size)
            .map_err(|e| format!("grow volume {VOLUME}: {e}"))?,
        Some(v) => v,
    };
    if !args.bs.is_multiple_of(info.block_size as u64) {
        return Err(format!(
            "volume {VOLUME} has {}-byte blocks; --bs {} is not a multiple (use --format)",
            info.block_size, args.bs
        ));
    }
    let pool = engine.pool_info();
    if pool.total_bytes < args.size {
        tracing::warn!(
            pool_bytes = pool.total_bytes,
            size = args.size,
            "the pool is smaller than the test volume; writes may fail with no space"
        );
    }
    Ok(info.id)
}

/// `verify`: write the pattern over the whole range, flush, read it all back.
fn verify(engine: &Engine, vol: VolumeId, args: &Args) -> Outcome {
    let threads = args.cores as usize;
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(args.seed, |d| d.as_nanos() as u64);
    let pattern = Pattern {
        block: args.block_size() as u64,
        generation,
    };
    tracing::info!(generation, "verify pattern");
    let mut total = Outcome {
        stats: Stats::new(),
        seconds: 0.0,
        mismatches: Vec::new(),
        stall_ns: 0,
    };
    for (label, kind) in [("verify-write", Kind::Write), ("verify-read", Kind::Read)] {
        let pass = Pass {
            label,
            qd: args.qd,
            deadline: None,
            data: Data::Pattern(pattern),
            windows: None,
        };
        let out = drive(engine, vol, threads, args.driver, &pass, &[], |t| {
            Generator::once(kind, args.size, args.bs, t, threads)
        });
        total.stats.merge(&out.stats);
        total.seconds += out.seconds;
        total.mismatches.extend(out.mismatches);
        if kind == Kind::Write {
            let c = engine.client().run(request(0, vol, Op::Flush, 0, 0, None));
            if let Err(e) = c.result {
                tracing::error!("flush after the verify writes failed: {e}");
                total.stats.errors += 1;
            }
        }
    }
    total.mismatches.sort_by_key(|m| m.lba);
    total
}

fn request(
    tag: u64,
    vol: VolumeId,
    op: Op,
    offset: u64,
    len: u64,
    buf: Option<AlignedBuf>,
) -> Request {
    Request {
        tag,
        volume: vol,
        op,
        offset,
        len,
        buf,
    }
}

/// Run one pass as `threads` jobs (pollers on the reactors, or submitter threads, as `driver`
/// says), drawing a progress line once a second, with each of `sides` running on a thread
/// of its own meanwhile.
#[allow(clippy::too_many_arguments)] // the pass and how to run it
fn drive(
    engine: &Engine,
    vol: VolumeId,
    threads: usize,
    driver: Driver,
    pass: &Pass,
    sides: &[&(dyn Fn(&SideCtx) + Sync)],
    generator: impl Fn(usize) -> Generator + Sync,
) -> Outcome {
    let progress = Arc::new(Progress::default());
    let stop = AtomicBool::new(false);
    let finished = Arc::new(Finished::default());
    let start = Barrier::new(threads + 1);
    let total_bytes = pass
        .deadline
        .is_none()
        .then(|| (0..threads).map(|t| generator(t).span()).sum::<u64>());
    let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
    let reactors = engine.reactors();
    let worker = |t: usize| Worker::new(vol, generator(t), pass.clone(), progress.clone(), t);
    let seconds = std::thread::scope(|s| {
        let handles: Vec<_> = match driver {
            Driver::Reactor => {
                // One job per reactor, round-robin, like one target connection each.
                for t in 0..threads {
                    let job = JobPoller::new(worker(t), finished.clone());
                    engine.add_poller(t, Box::new(job));
                }
                Vec::new()
            }
            Driver::Thread => (0..threads)
                .map(|t| {
                    let (finished, start) = (&finished, &start);
                    let w = worker(t);
                    let mut client = engine.client();
                    s.spawn(move || {
                        if reactors + t < cpus {
                            core_affinity::set_for_current(core_affinity::CoreId {
                                id: reactors + t,
                            });
                        }
                        start.wait();
                        let out = worker::run_thread(&mut client, w);
                        finished
                            .outcomes
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(out);
                        finished.count.fetch_add(1, Ordering::Release);
                    })
                })
                .collect(),
        };
        if driver == Driver::Thread {
            start.wait();
        }
        let began = Instant::now();
        let ctx = SideCtx {
            began,
            end: pass.deadline.map(|d| began + d),
            stop: &stop,
            progress: &progress,
        };
        let side_handles: Vec<_> = sides.iter().map(|f| s.spawn(move || f(&ctx))).collect();
        let show = pass.deadline.is_none_or(|d| d > Duration::from_secs(2));
        let mut line = ProgressLine::new(pass.label);
        let mut next = began + Duration::from_secs(1);
        while finished.count.load(Ordering::Acquire) < threads {
            std::thread::sleep(Duration::from_millis(20));
            if show && Instant::now() >= next {
                line.draw(&progress, total_bytes);
                next += Duration::from_secs(1);
            }
        }
        let seconds = match pass.deadline {
            Some(d) => d.as_secs_f64(),
            None => began.elapsed().as_secs_f64(),
        };
        line.finish();
        stop.store(true, Ordering::Release);
        for h in side_handles {
            h.join().expect("side thread panicked");
        }
        for h in handles {
            h.join().expect("submitter thread panicked");
        }
        seconds
    });
    let mut total = Outcome::empty();
    total.seconds = seconds;
    let outs = std::mem::take(&mut *finished.outcomes.lock().unwrap_or_else(|e| e.into_inner()));
    for o in outs {
        total.stats.merge(&o.stats);
        total.stall_ns = total.stall_ns.max(o.stall_ns);
        total.mismatches.extend(o.mismatches);
    }
    total
}
