//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::time::Duration;
use tessel_engine::*;

/// Set (to anything but `0`) by tools/test, and so by CI: a test that cannot run here (no
/// loop device, say) fails instead of skipping.
pub const REQUIRE_TOOLS: &str = "TESSEL_REQUIRE_TOOLS";

/// A test cannot run here because of `why`: fail it under `TESSEL_REQUIRE_TOOLS`, else say
/// so on stderr, past the harness's capture, so the skip is visible; the caller returns.
#[track_caller]
pub fn skip(why: &str) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("test");
    if std::env::var_os(REQUIRE_TOOLS).is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("{name}: {why}; {REQUIRE_TOOLS} makes this a failure");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {name}: {why} ({REQUIRE_TOOLS}=1 makes this a failure)"
    );
}

/// How long one engine test (or one proptest case) may run before [`watchdog`] ends the
/// test binary: far beyond the slowest test on a loaded 2-core machine.
pub const TEST_LIMIT: Duration = Duration::from_secs(300);

/// Held for a test's duration: if the test still runs after `TEST_LIMIT` (a hang: a lost
/// completion, a deadlock), the test binary exits with a failure naming the test, instead
/// of CI waiting for ever. `TESSEL_TEST_LIMIT_S=n` changes the limit.
#[must_use]
pub fn watchdog() -> Watchdog {
    let limit = std::env::var("TESSEL_TEST_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(TEST_LIMIT, Duration::from_secs);
    let name = std::thread::current()
        .name()
        .unwrap_or("an engine test")
        .to_string();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            let _ = writeln!(
                std::io::stderr(),
                "WATCHDOG: {name} still running after {limit:?}; failing the test binary"
            );
            std::process::exit(101);
        }
    });
    Watchdog { _done: done }
}

/// See [`watchdog`]; dropping it (the test ended, passed or panicked) disarms it.
pub struct Watchdog {
    _done: std::sync::mpsc::Sender<()>,
}

/// An engine config for tests: `n` unpinned adaptive reactors.
pub fn cfg(n: usize) -> EngineConfig {
    EngineConfig {
        cores: (0..n).collect(),
        poll: PollMode::Adaptive,
        ring_entries: 64,
        spin: Duration::from_micros(20),
        pin: false,
        submit_batch: 1,
    }
}

/// An in-memory disk of `size` bytes that holds garbage (seeded) rather than zeros, as a
/// reused disk does: a block the engine reads without having written it shows up as bytes
/// no test wrote, instead of passing for zeros.
pub fn garbage_disk(size: u64, crash_simulation: bool, seed: u64) -> std::sync::Arc<MemDisk> {
    let disk = MemDisk::new(size, crash_simulation);
    let mut rng = Rng(seed);
    let mut chunk = vec![0u8; 1 << 20];
    for w in chunk.chunks_mut(8) {
        w.copy_from_slice(&rng.next().to_le_bytes());
    }
    // One MiB of it repeated: garbage all the same, and cheap enough for every case.
    for off in (0..size).step_by(chunk.len()) {
        disk.write(off, &chunk);
    }
    disk.flush();
    disk
}

/// Small pool geometry so that tests cross cluster and shard boundaries.
pub fn small_opts() -> FormatOptions {
    FormatOptions {
        cluster_size: 16 << 10,
        shard_size: 1 << 20,
        journal_regions: 4,
        force: false,
    }
}

/// Run one request synchronously.
pub fn run(
    c: &mut Client,
    vol: VolumeId,
    op: Op,
    offset: u64,
    len: u64,
    data: Option<&[u8]>,
) -> Completion {
    let buf = match op {
        Op::Read => Some(AlignedBuf::zeroed(len as usize)),
        Op::Write { .. } => Some(AlignedBuf::from_slice(data.expect("write data"))),
        _ => None,
    };
    c.run(Request {
        tag: 1,
        volume: vol,
        op,
        offset,
        len,
        buf,
    })
}

pub fn write(c: &mut Client, vol: VolumeId, offset: u64, data: &[u8]) {
    let r = run(
        c,
        vol,
        Op::Write { fua: false },
        offset,
        data.len() as u64,
        Some(data),
    );
    r.result.expect("write");
}

pub fn read(c: &mut Client, vol: VolumeId, offset: u64, len: u64) -> Vec<u8> {
    let r = run(c, vol, Op::Read, offset, len, None);
    r.result.expect("read");
    r.buf.expect("buffer").as_slice().to_vec()
}

pub fn flush(c: &mut Client, vol: VolumeId) {
    run(c, vol, Op::Flush, 0, 0, None).result.expect("flush");
}

/// Bytes with a recognisable pattern for (offset, generation).
pub fn pattern(offset: u64, len: usize, gen: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((offset as usize + i) / 512 % 251) as u8 ^ gen.wrapping_mul(37))
        .collect()
}

/// A small deterministic generator (splitmix64), so that a seed replays a workload.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}
