//! Power loss on the real I/O path: `tessel serve` with its pool file on the powercut fs
//! (powercut/), so its O_DIRECT io_uring writes and fdatasyncs reach a recorder that models
//! a volatile write cache. NBD clients write seeded data (some with FUA) and FLUSH; snapshots
//! and a clone are created, written, inflated and deleted meanwhile; the power is cut at a seeded point right after a
//! request is answered; tessel restarts on the crash image and every block is checked
//! against the durability contract (DESIGN.md §6):
//! - a write acknowledged before a FLUSH that completed, or acknowledged with FUA, reads
//!   back (or a later write to the same block does);
//! - every other block reads as its value before the cycle or one written since, never
//!   foreign bytes, never older than its last durable write;
//! - a snapshot whose create returned exists and reads as at creation (every write
//!   acknowledged before the create, either version of those in flight during it), and
//!   exactly as it read after the first cut it went through; one whose delete returned is
//!   gone;
//! - a clone of one of those snapshots (created, written by its own client, inflated and
//!   deleted across the cycles) exists exactly when its create returned and no delete did;
//!   it reads as its origin snapshot plus its own writes, by the rules above, also after
//!   its origin was deleted (once inflated); an inflate that returned left it independent.
//!
//! `cargo test` runs 20 cycles (about 20 s); TESSEL_POWERCUT_CYCLES=N (tools/crashtest) runs
//! more, TESSEL_POWERCUT_SEED picks the seeds (printed in the summary line). The crash image
//! and the cut point (after which answered request) are chosen by the seed; which requests
//! are in flight at that point still depends on thread timing.

mod common;

use common::raw_nbd::{RawNbd, CMD_FLUSH, CMD_WRITE};
use common::{cli, pseudo_random, say, skip, Daemon, TestDir};
use std::collections::BTreeMap;
use std::io::{Read, Write as _};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tessel_powercut::{CrashReport, Disk, Mounted, SplitMix};

const BLOCK: u64 = 4096;
/// Blocks the clients write: 16 MiB of the 64 MiB volume.
const REGION: u64 = 4096;
/// A stripe of 16 blocks (64 KiB) belongs to one client, so each block's writes are
/// ordered; a write stays inside its stripe.
const STRIPE: u64 = 16;
const CLIENTS: u64 = 3;
const MAX_WRITE_BLOCKS: u64 = 8;
/// Snapshots kept at once; the oldest is deleted before a new one is created.
const KEEP_SNAPSHOTS: usize = 2;
const FLAG_FUA: u16 = 1;

/// Block contents for write `id` at block `lba`: the id and lba, then seeded bytes, so a
/// read names the write it came from and any foreign or torn byte is seen.
fn content(id: u64, lba: u64) -> Vec<u8> {
    let mut v = pseudo_random(BLOCK as usize, id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ lba);
    v[..8].copy_from_slice(&id.to_le_bytes());
    v[8..16].copy_from_slice(&lba.to_le_bytes());
    v
}

/// Which write a block read back holds: Some(0) for zeros (never written), Some(id), or
/// None for bytes no write put there.
fn decode(block: &[u8], lba: u64) -> Option<u64> {
    if block.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let id = u64::from_le_bytes(block[..8].try_into().unwrap());
    (block == content(id, lba).as_slice()).then_some(id)
}

/// One NBD write as the clients saw it; times are ticks of `Log::clock`.
struct Write {
    id: u64,
    /// To the clone rather than vol0.
    clone: bool,
    first: u64,
    blocks: u64,
    fua: bool,
    issued: u64,
    acked: Option<u64>,
}

/// A snapshot create or delete as the snapshot thread saw it.
struct SnapOp {
    name: String,
    create: bool,
    sent: u64,
    returned: Option<u64>,
}

/// What happened in one cycle, in one order (a logical clock under one lock).
#[derive(Default)]
struct Log {
    clock: u64,
    writes: Vec<Write>,
    /// The latest send time of a FLUSH answered with success: every write acknowledged
    /// before it is durable (NBD_FLAG_CAN_MULTI_CONN: on any connection).
    flushed_before: u64,
    /// The same for the clone's connection.
    clone_flushed_before: u64,
    flushes: u64,
    /// Requests answered so far (writes and flushes).
    answered: u64,
    snaps: Vec<SnapOp>,
    clone_ops: Vec<CloneOp>,
}

/// A clone create, inflate or delete as the clone thread saw it.
struct CloneOp {
    step: CloneStep,
    returned: Option<u64>,
}

impl Log {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn durable(&self, w: &Write) -> bool {
        let flushed = if w.clone {
            self.clone_flushed_before
        } else {
            self.flushed_before
        };
        w.acked.is_some_and(|a| w.fua || a < flushed)
    }
}

/// The cut: which answered request it follows, and the crash image it left.
struct Cut {
    /// Cut after this many answered requests...
    after: u64,
    /// ...at the first FLUSH answered from then on, if set (a FLUSH that did not reach the
    /// disk is caught only by a cut before the reactor's own next commit).
    at_flush: bool,
    seed: u64,
    done: AtomicBool,
    image: Mutex<Option<(Disk, CrashReport)>>,
}

struct Shared {
    log: Mutex<Log>,
    cut: Cut,
    fs: Mounted,
    daemon_pid: i32,
    /// The clone exists and may be written (set once its create returned).
    clone_ready: AtomicBool,
}

impl Shared {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called after each answered request: cut the power if this is the point.
    fn answered(&self, flush: bool) {
        let n = {
            let mut log = self.log();
            log.answered += 1;
            log.answered
        };
        if n >= self.cut.after
            && (flush || !self.cut.at_flush)
            && !self.cut.done.swap(true, Ordering::SeqCst)
        {
            // The disk goes first, as in a power cut; the daemon dies right after.
            let image = self.fs.power_cut(self.cut.seed);
            // SAFETY: kill(2) on the daemon's pid, which the test has not reaped yet.
            unsafe {
                libc::kill(self.daemon_pid, libc::SIGKILL);
            }
            *self.cut.image.lock().unwrap() = Some(image);
        }
    }
}

/// Send one request and read its simple reply; Ok(errno).
fn request(
    nbd: &mut RawNbd,
    kind: u16,
    flags: u16,
    offset: u64,
    data: &[u8],
) -> std::io::Result<u32> {
    let mut req = nbd.header(kind, offset, data.len() as u32);
    req[4..6].copy_from_slice(&flags.to_be_bytes());
    req.extend_from_slice(data);
    nbd.stream.write_all(&req)?;
    let mut reply = [0u8; 16];
    nbd.stream.read_exact(&mut reply)?;
    Ok(u32::from_be_bytes(reply[4..8].try_into().unwrap()))
}

/// Who writes: one of the `CLIENTS` writers of vol0, or the clone's single writer.
#[derive(Clone, Copy)]
enum Writer {
    Vol(u64),
    Clone,
}

/// One client: seeded writes to its own stripes, FUA now and then, FLUSH now and then,
/// until its connection fails (the cut).
fn client(shared: &Shared, addr: &str, export: &str, who: Writer, seed: u64, next_id: u64) {
    let (me, clients, clone) = match who {
        Writer::Vol(me) => (me, CLIENTS, false),
        Writer::Clone => (0, 1, true),
    };
    let mut nbd = RawNbd::connect(addr, export);
    let mut rng = SplitMix(seed);
    let stripes = REGION / STRIPE / clients;
    let mut id = next_id;
    while !shared.cut.done.load(Ordering::SeqCst) {
        if rng.below(12) == 0 {
            let sent = shared.log().tick();
            match request(&mut nbd, CMD_FLUSH, 0, 0, &[]) {
                Ok(0) => {
                    let mut log = shared.log();
                    if clone {
                        log.clone_flushed_before = log.clone_flushed_before.max(sent);
                    } else {
                        log.flushed_before = log.flushed_before.max(sent);
                    }
                    log.flushes += 1;
                }
                _ => return,
            }
            shared.answered(true);
            continue;
        }
        let stripe = (rng.below(stripes) * clients + me) * STRIPE;
        let first = stripe + rng.below(STRIPE);
        let blocks = 1 + rng.below(MAX_WRITE_BLOCKS.min(stripe + STRIPE - first));
        let fua = rng.below(8) == 0;
        id += 1;
        let mut data = Vec::with_capacity((blocks * BLOCK) as usize);
        for b in first..first + blocks {
            data.extend_from_slice(&content(id, b));
        }
        let at = {
            let mut log = shared.log();
            let issued = log.tick();
            log.writes.push(Write {
                id,
                clone,
                first,
                blocks,
                fua,
                issued,
                acked: None,
            });
            log.writes.len() - 1
        };
        let flags = if fua { FLAG_FUA } else { 0 };
        match request(&mut nbd, CMD_WRITE, flags, first * BLOCK, &data) {
            Ok(0) => {
                let mut log = shared.log();
                let t = log.tick();
                log.writes[at].acked = Some(t);
            }
            _ => return,
        }
        shared.answered(false);
    }
}

/// The snapshot thread: once the clients have answered `at` requests, delete the oldest
/// snapshot if there are enough, then create `name`.
fn snapshotter(shared: &Shared, socket: &Path, at: u64, delete: Option<String>, name: String) {
    while shared.log().answered < at {
        if shared.cut.done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let ops = delete.map(|d| (d, false)).into_iter().chain([(name, true)]);
    for (name, create) in ops {
        let sent = shared.log().tick();
        let verb = if create { "create" } else { "delete" };
        let out = cli(socket, &["snapshot", verb, "vol0", &name]);
        let mut log = shared.log();
        let returned = out.status.success().then(|| log.tick());
        log.snaps.push(SnapOp {
            name,
            create,
            sent,
            returned,
        });
        if returned.is_none() {
            return;
        }
    }
}

/// This cycle's clone operation, chosen from the model when the cycle starts.
#[derive(Clone, Debug)]
enum CloneStep {
    /// Clone snapshot `origin` of vol0 as `name`, then write to it.
    Create { name: String, origin: String },
    /// Write to the clone and inflate it meanwhile.
    Inflate,
    /// Write to the clone.
    Write,
    /// Delete the clone (an inflated one).
    Delete,
}

/// The clone thread: once the clients have answered `at` requests, run the step's
/// operation; the clone's writer runs meanwhile (from the create's return, for a create).
fn cloner(shared: &Shared, socket: &Path, at: u64, step: CloneStep, name: &str) {
    let create = matches!(step, CloneStep::Create { .. });
    if !create {
        shared.clone_ready.store(true, Ordering::SeqCst);
    }
    if matches!(step, CloneStep::Write) {
        return;
    }
    while shared.log().answered < at {
        if shared.cut.done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    let source;
    let args: Vec<&str> = match &step {
        CloneStep::Create { origin, .. } => {
            source = format!("vol0@{origin}");
            vec!["clone", "create", &source, name]
        }
        CloneStep::Inflate => vec!["clone", "inflate", name, "--wait"],
        CloneStep::Delete => vec!["volume", "delete", name],
        CloneStep::Write => unreachable!("returned above"),
    };
    let out = cli(socket, &args);
    let mut log = shared.log();
    let returned = out.status.success().then(|| log.tick());
    log.clone_ops.push(CloneOp { step, returned });
    if create && returned.is_some() {
        shared.clone_ready.store(true, Ordering::SeqCst);
    }
}

/// The clone's writer: a client of the clone export once it exists.
fn clone_writer(shared: &Shared, addr: &str, name: &str, seed: u64, first_id: u64) {
    while !shared.clone_ready.load(Ordering::SeqCst) {
        if shared.cut.done.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    client(shared, addr, name, Writer::Clone, seed, first_id);
}

/// The clone as the model knows it.
struct CloneModel {
    name: String,
    origin: String,
    /// Each block's value as last read (at its creation: the origin's).
    prior: Vec<u64>,
    /// Its create returned, or it was seen after a cut.
    must_exist: bool,
    /// Seen without an origin after a cut (inflated): its origin may now be deleted.
    inflated: bool,
}

/// What a snapshot must read: candidates per block until it is first seen after a cut,
/// then exactly what it read then.
enum SnapContent {
    Candidates(Vec<Vec<u64>>),
    Exact(Vec<u64>),
}

struct Snapshot {
    must_exist: bool,
    content: SnapContent,
}

/// Across cycles: each block's value after the last cut, and the snapshots.
struct Model {
    prior: Vec<u64>,
    snaps: BTreeMap<String, Snapshot>,
    next_snap: u64,
    clone: Option<CloneModel>,
    next_clone: u64,
}

#[derive(Default)]
struct Totals {
    cycles: u64,
    acked: u64,
    durable: u64,
    flushes: u64,
    lost: u64,
    bad_snapshots: u64,
    snapshots_checked: u64,
    bad_clones: u64,
    clones_checked: u64,
    /// Clones checked after their origin snapshot was deleted (inflated ones).
    orphans_checked: u64,
    clone_ops: u64,
    report: CrashReport,
    fsyncs: u64,
    violations: Vec<String>,
}

fn config(mnt: &Path) -> String {
    format!(
        r#"[engine]
log_level = "warn"

[[pool]]
name = "default"
devices = ["{}/pool0.img"]
create_size = "256M"

[[volume]]
name = "vol0"
pool = "default"
size = "64M"
block_size = 4096
"#,
        mnt.display()
    )
}

fn start(dir: &Path, config: &Path) -> Daemon {
    let config = config.to_str().unwrap();
    let mut last = String::new();
    for _ in 0..5 {
        match Daemon::try_start(dir, &["--config", config]) {
            Ok(d) => return d,
            Err(log) if log.contains("NBD listen on") => last = log,
            Err(log) => panic!("tessel serve did not start on the crash image:\n{log}"),
        }
    }
    panic!("tessel serve found no free NBD port:\n{last}")
}

/// Read `REGION` blocks of `export` and name the write each holds (None: foreign bytes).
fn read_region(addr: &str, export: &str) -> Vec<Option<u64>> {
    let mut nbd = RawNbd::connect(addr, export);
    let per = 32u64;
    let mut out = Vec::with_capacity(REGION as usize);
    for first in (0..REGION).step_by(per as usize) {
        let data = nbd
            .read(first * BLOCK, (per * BLOCK) as u32)
            .unwrap_or_else(|e| panic!("read {export} block {first}: errno {e}"));
        for (i, b) in data.chunks(BLOCK as usize).enumerate() {
            out.push(decode(b, first + i as u64));
        }
    }
    out
}

/// Each block's writes this cycle to vol0 or the clone, in issue order (one client owns
/// each block).
fn histories(log: &Log, clone: bool) -> Vec<Vec<usize>> {
    let mut hist = vec![Vec::new(); REGION as usize];
    for (i, w) in log
        .writes
        .iter()
        .enumerate()
        .filter(|(_, w)| w.clone == clone)
    {
        for b in w.first..w.first + w.blocks {
            hist[b as usize].push(i);
        }
    }
    hist
}

/// What a snapshot created at `sent` and returned at `end` may hold at each block.
fn snapshot_candidates(
    model: &Model,
    log: &Log,
    hist: &[Vec<usize>],
    sent: u64,
    end: u64,
) -> Vec<Vec<u64>> {
    hist.iter()
        .enumerate()
        .map(|(b, h)| {
            let base = h
                .iter()
                .rev()
                .find(|&&i| log.writes[i].acked.is_some_and(|a| a < sent))
                .map_or(model.prior[b], |&i| log.writes[i].id);
            let mut c = vec![base];
            c.extend(
                h.iter()
                    .map(|&i| &log.writes[i])
                    .filter(|w| w.issued < end && w.acked.is_none_or(|a| a > sent))
                    .map(|w| w.id),
            );
            c
        })
        .collect()
}

/// Check each block read back against this cycle's writes to it (`hist`) and its value
/// before the cycle (`prior`), which moves on to what was read; the violations found.
fn check_blocks(
    what: &str,
    got: &[Option<u64>],
    hist: &[Vec<usize>],
    log: &Log,
    prior: &mut [u64],
    cycle: u64,
) -> Vec<String> {
    let mut bad = Vec::new();
    for (b, h) in hist.iter().enumerate() {
        let last_durable = h.iter().rposition(|&i| log.durable(&log.writes[i]));
        let allowed: Vec<u64> = match last_durable {
            Some(k) => h[k..].iter().map(|&i| log.writes[i].id).collect(),
            None => std::iter::once(prior[b])
                .chain(h.iter().map(|&i| log.writes[i].id))
                .collect(),
        };
        match got[b] {
            Some(v) if allowed.contains(&v) => prior[b] = v,
            other => {
                bad.push(format!(
                    "cut {cycle}: {what} block {b} holds {}, allowed {allowed:?} (durable: {})",
                    other.map_or("foreign bytes".to_string(), |v| format!("write {v}")),
                    last_durable.is_some()
                ));
                prior[b] = other.unwrap_or(u64::MAX);
            }
        }
    }
    bad
}

/// After the restart: the clone exists exactly when its create returned and no delete did
/// (either way when one was cut short); an inflate that returned left it without an origin;
/// it reads as its origin snapshot plus its own writes, by the rules vol0's blocks follow,
/// also once its origin is deleted. Without a clone, vol0 is the only volume.
fn verify_clone(d: &Daemon, model: &mut Model, log: &Log, totals: &mut Totals, cycle: u64) {
    let mut inflate_returned = false;
    let mut deleted: Option<bool> = None;
    for op in &log.clone_ops {
        totals.clone_ops += 1;
        match &op.step {
            CloneStep::Create { name, origin } => {
                let Some(SnapContent::Exact(prior)) = model.snaps.get(origin).map(|s| &s.content)
                else {
                    panic!("clone origin {origin} was chosen without its exact contents");
                };
                model.clone = Some(CloneModel {
                    name: name.clone(),
                    origin: origin.clone(),
                    prior: prior.clone(),
                    must_exist: op.returned.is_some(),
                    inflated: false,
                });
            }
            CloneStep::Inflate => inflate_returned = op.returned.is_some(),
            CloneStep::Delete => deleted = Some(op.returned.is_some()),
            CloneStep::Write => {}
        }
    }
    let listed = d.cli_json(&["volume", "list"]);
    let volumes = listed["volumes"].as_array().expect("volume list");
    let mut bad = Vec::new();
    let expected = model.clone.as_ref().map(|c| c.name.as_str());
    for v in volumes {
        let name = v["name"].as_str().expect("name");
        if name != "vol0" && Some(name) != expected {
            bad.push(format!(
                "cut {cycle}: volume {name} exists, but no clone of that name may"
            ));
        }
    }
    if let Some(c) = model.clone.as_mut() {
        match volumes.iter().find(|v| v["name"] == c.name.as_str()) {
            None => {
                if c.must_exist && deleted.is_none() {
                    bad.push(format!(
                        "cut {cycle}: clone {} returned from create but is gone",
                        c.name
                    ));
                }
                model.clone = None;
            }
            Some(v) => {
                if deleted == Some(true) {
                    bad.push(format!(
                        "cut {cycle}: clone {} exists after its delete returned",
                        c.name
                    ));
                }
                let origin = v["origin"].as_str();
                if inflate_returned && origin.is_some() {
                    bad.push(format!(
                        "cut {cycle}: clone {} still depends on {origin:?} after its inflate returned",
                        c.name
                    ));
                }
                c.inflated = origin.is_none();
                c.must_exist = true;
                let got = read_region(&d.nbd_addr(), &c.name);
                let hist = histories(log, true);
                bad.extend(check_blocks(&c.name, &got, &hist, log, &mut c.prior, cycle));
                totals.clones_checked += 1;
                if !model.snaps.contains_key(&c.origin) {
                    totals.orphans_checked += 1;
                }
            }
        }
    }
    totals.bad_clones += bad.len() as u64;
    totals.violations.extend(bad);
}

/// After the restart: check the volume and every snapshot against the cycle's log, and
/// move the model on to what was read.
fn verify(d: &Daemon, model: &mut Model, log: &Log, totals: &mut Totals, cycle: u64) {
    let hist = histories(log, false);
    // Snapshot operations of this cycle, in the order they were sent; candidates from the
    // values before the cycle (`prior`, moved on below).
    for op in &log.snaps {
        if op.create {
            let end = op.returned.unwrap_or(u64::MAX);
            model.snaps.insert(
                op.name.clone(),
                Snapshot {
                    must_exist: op.returned.is_some(),
                    content: SnapContent::Candidates(snapshot_candidates(
                        model, log, &hist, op.sent, end,
                    )),
                },
            );
        } else if op.returned.is_some() {
            model.snaps.remove(&op.name);
        } else if let Some(s) = model.snaps.get_mut(&op.name) {
            s.must_exist = false;
        }
    }
    let addr = d.nbd_addr();
    let got = read_region(&addr, "vol0");
    let bad = check_blocks("vol0", &got, &hist, log, &mut model.prior, cycle);
    totals.lost += bad.len() as u64;
    totals.violations.extend(bad);

    let listed = d.cli_json(&["snapshot", "list", "vol0"]);
    let names: Vec<String> = listed["snapshots"]
        .as_array()
        .expect("snapshot list")
        .iter()
        .map(|s| s["name"].as_str().expect("name").to_string())
        .collect();
    for n in &names {
        if !model.snaps.contains_key(n) {
            totals.bad_snapshots += 1;
            totals.violations.push(format!(
                "cut {cycle}: snapshot {n} exists, but its delete returned or it was never created"
            ));
        }
    }
    let mut gone = Vec::new();
    for (name, snap) in model.snaps.iter_mut() {
        if !names.contains(name) {
            if snap.must_exist {
                totals.bad_snapshots += 1;
                totals.violations.push(format!(
                    "cut {cycle}: snapshot {name} returned from create but is gone"
                ));
            }
            gone.push(name.clone());
            continue;
        }
        totals.snapshots_checked += 1;
        // Exported only while it is read, so that the snapshot thread can delete it.
        let export = format!("vol0@{name}");
        d.cli_ok(&["export", "add", &export]);
        let read = read_region(&addr, &export);
        d.cli_ok(&["export", "remove", &export]);
        let bad = (0..REGION as usize).find(|&b| match (&snap.content, read[b]) {
            (_, None) => true,
            (SnapContent::Candidates(c), Some(v)) => !c[b].contains(&v),
            (SnapContent::Exact(e), Some(v)) => e[b] != v,
        });
        if let Some(b) = bad {
            totals.bad_snapshots += 1;
            let want = match &snap.content {
                SnapContent::Candidates(c) => format!("one of {:?}", c[b]),
                SnapContent::Exact(e) => format!("write {}", e[b]),
            };
            totals.violations.push(format!(
                "cut {cycle}: snapshot {name} block {b} holds {:?}, want {want}",
                read[b]
            ));
        }
        snap.content = SnapContent::Exact(read.iter().map(|v| v.unwrap_or(u64::MAX)).collect());
        snap.must_exist = true;
    }
    for name in gone {
        model.snaps.remove(&name);
    }
    verify_clone(d, model, log, totals, cycle);
}

#[test]
fn writes_acknowledged_before_flush_or_with_fua_and_snapshots_survive_power_cuts() {
    if !Path::new("/dev/fuse").exists() {
        skip(module_path!(), "no /dev/fuse (the powercut fs needs FUSE)");
        return;
    }
    let cycles: u64 = std::env::var("TESSEL_POWERCUT_CYCLES")
        .ok()
        .map(|v| v.parse().expect("TESSEL_POWERCUT_CYCLES: a number"))
        .unwrap_or(20);
    let base_seed: u64 = std::env::var("TESSEL_POWERCUT_SEED")
        .ok()
        .map(|v| v.parse().expect("TESSEL_POWERCUT_SEED: a number"))
        .unwrap_or(1);
    let started = Instant::now();
    let dir = TestDir::new("powercut");
    let mnt = dir.join("mnt");
    let data = dir.join("data");
    std::fs::create_dir_all(&mnt).unwrap();
    let config_path = dir.join("tessel.toml");
    std::fs::write(&config_path, config(&mnt)).unwrap();

    let mut model = Model {
        prior: vec![0; REGION as usize],
        snaps: BTreeMap::new(),
        next_snap: 0,
        clone: None,
        next_clone: 0,
    };
    let mut totals = Totals::default();
    let mut disk = Disk::default();
    let mut last: Option<Log> = None;
    let keep_going = std::env::var_os("TESSEL_POWERCUT_KEEP_GOING").is_some();
    // Cycle n: power on the image cycle n-1 left, check it, then run and cut; one more
    // power-on checks the last cut.
    for cycle in 0..=cycles {
        let fs = Mounted::mount(&mnt, disk).expect("mount the powercut fs (root and FUSE needed)");
        let mut d = start(&data, &config_path);
        if let Some(log) = last.take() {
            verify(&d, &mut model, &log, &mut totals, cycle);
        }
        if cycle == cycles || (!totals.violations.is_empty() && !keep_going) {
            d.stop();
            drop(fs);
            break;
        }
        let seed = base_seed.wrapping_mul(1_000_003).wrapping_add(cycle);
        let mut rng = SplitMix(seed);
        let shared = Arc::new(Shared {
            log: Mutex::new(Log::default()),
            cut: Cut {
                after: 100 + rng.below(600),
                at_flush: rng.below(2) == 0,
                seed: rng.next_u64(),
                done: AtomicBool::new(false),
                image: Mutex::new(None),
            },
            fs,
            daemon_pid: d.pid(),
            clone_ready: AtomicBool::new(false),
        });
        let snap_at = rng.below(shared.cut.after + 100);
        // The oldest snapshot goes, unless a clone not yet inflated depends on it.
        let pinned = model
            .clone
            .as_ref()
            .filter(|c| !c.inflated)
            .map(|c| &c.origin);
        let delete = (model.snaps.len() >= KEEP_SNAPSHOTS)
            .then(|| model.snaps.keys().find(|&k| Some(k) != pinned).cloned())
            .flatten();
        // A clone is made of the newest snapshot whose contents are known exactly and that
        // stays this cycle; an existing one is written, inflated, or deleted once inflated.
        let clone_at = rng.below(shared.cut.after);
        let step = match &model.clone {
            None => model
                .snaps
                .iter()
                .rev()
                .find(|(n, s)| {
                    Some(*n) != delete.as_ref()
                        && s.must_exist
                        && matches!(s.content, SnapContent::Exact(_))
                })
                .map(|(n, _)| CloneStep::Create {
                    name: format!("c{:06}", model.next_clone + 1),
                    origin: n.clone(),
                }),
            Some(c) if c.inflated && rng.below(3) == 0 => Some(CloneStep::Delete),
            Some(c) if !c.inflated && rng.below(2) == 0 => Some(CloneStep::Inflate),
            Some(_) => Some(CloneStep::Write),
        };
        let clone_name = match (&step, &model.clone) {
            (Some(CloneStep::Create { name, .. }), _) => {
                model.next_clone += 1;
                name.clone()
            }
            (_, Some(c)) => c.name.clone(),
            // Without a clone, the only step is a create.
            (_, None) => String::new(),
        };
        model.next_snap += 1;
        // Zero-padded: the model's sorted names are then oldest first.
        let snap_name = format!("s{:06}", model.next_snap);
        let addr = d.nbd_addr();
        let socket = d.socket.clone();
        std::thread::scope(|s| {
            for me in 0..CLIENTS {
                let (shared, addr) = (&shared, &addr);
                let client_seed = rng.next_u64();
                let first_id = ((cycle + 1) << 40) | (me << 32);
                s.spawn(move || {
                    client(shared, addr, "vol0", Writer::Vol(me), client_seed, first_id)
                });
            }
            let (shared, socket) = (&shared, &socket);
            s.spawn(move || snapshotter(shared, socket, snap_at, delete, snap_name));
            if let Some(step) = step {
                let (addr, name) = (&addr, &clone_name);
                if !matches!(step, CloneStep::Delete) {
                    let seed = rng.next_u64();
                    let first_id = ((cycle + 1) << 40) | (CLIENTS << 32);
                    s.spawn(move || clone_writer(shared, addr, name, seed, first_id));
                }
                s.spawn(move || cloner(shared, socket, clone_at, step, name));
            }
        });
        d.kill9();
        let shared = Arc::into_inner(shared).expect("threads done");
        let stats = shared.fs.stats();
        let (image, report) = shared
            .cut
            .image
            .into_inner()
            .unwrap()
            .expect("the clients reached the cut");
        drop(shared.fs);
        disk = image;
        let log = shared.log.into_inner().unwrap();
        totals.cycles += 1;
        totals.acked += log.writes.iter().filter(|w| w.acked.is_some()).count() as u64;
        totals.durable += log.writes.iter().filter(|w| log.durable(w)).count() as u64;
        totals.flushes += log.flushes;
        totals.fsyncs += stats.fsyncs;
        totals.report.volatile += report.volatile;
        totals.report.kept += report.kept;
        totals.report.torn += report.torn;
        totals.report.dropped += report.dropped;
        last = Some(log);
        if (cycle + 1) % 100 == 0 {
            say(&format!(
                "crash: {} of {cycles} cycles, {} lost writes, {} bad snapshots, {} bad clones so \
                 far ({:.0} s)",
                cycle + 1,
                totals.lost,
                totals.bad_snapshots,
                totals.bad_clones,
                started.elapsed().as_secs_f64()
            ));
        }
    }

    say(&format!(
        "crash: {} cycles, {} lost writes, {} bad snapshots, {} bad clones ({} writes \
         acknowledged, {} of them durable by FLUSH or FUA, {} flushes, {} snapshot checks; \
         {} clone operations, {} clone checks, {} of them after the origin's deletion; pool \
         fdatasyncs {}; volatile writes at the cuts {}: {} kept, {} torn, {} dropped; seed \
         {base_seed}; {:.1} s)",
        totals.cycles,
        totals.lost,
        totals.bad_snapshots,
        totals.bad_clones,
        totals.acked,
        totals.durable,
        totals.flushes,
        totals.snapshots_checked,
        totals.clone_ops,
        totals.clones_checked,
        totals.orphans_checked,
        totals.fsyncs,
        totals.report.volatile,
        totals.report.kept,
        totals.report.torn,
        totals.report.dropped,
        started.elapsed().as_secs_f64()
    ));
    assert!(
        totals.violations.is_empty(),
        "power cuts broke the durability contract (seed {base_seed}):\n{}",
        totals
            .violations
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        totals.durable > 0,
        "no write was ever durable: the test tested nothing"
    );
    assert!(
        totals.report.dropped + totals.report.torn > 0,
        "no cut lost a volatile write: the test tested nothing"
    );
}
