//! The NBD export through real initiators (qemu-img, qemu-io, nbdinfo, nbdcopy, fio, nbdsh)
//! and hand-made malformed traffic against a running `tessel serve`.

#[macro_use]
mod common;

use common::raw_nbd::{self, RawNbd};
use common::{check, qemu_io, run, Daemon, TestDir};
use serde_json::Value;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

const GIB: u64 = 1 << 30;

#[test]
fn qemu_img_info_reports_the_volume_size() {
    require!("qemu-img");
    let d = Daemon::start("nbd-info");
    let out = check(Command::new("qemu-img").args(["info", "--output=json", &d.uri("vol0")]));
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["virtual-size"], 4 * GIB, "{info}");
    assert_eq!(info["format"], "raw", "{info}");
}

#[test]
fn qemu_io_pattern_round_trips() {
    require!("qemu-io");
    let d = Daemon::start("nbd-pattern");
    let uri = d.uri("vol0");
    qemu_io(
        &uri,
        &[
            "write -P 0xa5 0 1M",
            // Less than a cluster, and straddling a cluster boundary.
            "write -P 0x5a 1M 4k",
            "write -P 0x3c 2044k 8k",
            // Straddling the 1 GiB shard boundary: the request is split between owners.
            "write -P 0xc3 1048512k 128k",
            // The last block of the volume.
            "write -P 0x77 4194300k 4k",
        ],
    );
    // A second connection sees what the first wrote.
    qemu_io(
        &uri,
        &[
            "read -P 0xa5 0 1M",
            "read -P 0x5a 1M 4k",
            "read -P 0 1028k 1016k",
            "read -P 0x3c 2044k 8k",
            "read -P 0xc3 1048512k 128k",
            "read -P 0x77 4194300k 4k",
            "read -P 0 2G 1M",
        ],
    );
}

#[test]
fn write_zeroes_and_discard_read_back_as_zeros() {
    require!("qemu-io");
    let d = Daemon::start("nbd-zero");
    let uri = d.uri("vol0");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 2M",
            "write -z 256k 256k",
            // Not cluster-aligned: the blocks around it keep their data.
            "write -z 1540k 8k",
            "discard 1M 512k",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 256k",
            "read -P 0 256k 256k",
            "read -P 0x11 512k 512k",
            "read -P 0 1M 512k",
            "read -P 0x11 1536k 4k",
            "read -P 0 1540k 8k",
            "read -P 0x11 1548k 500k",
        ],
    );
}

/// Merge a `qemu-img map`/`nbdinfo --map` style list into the ranges that hold data.
fn data_ranges(entries: impl Iterator<Item = (u64, u64, bool)>) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (start, len, data) in entries {
        if !data {
            continue;
        }
        match ranges.last_mut() {
            Some(last) if last.1 == start => last.1 = start + len,
            _ => ranges.push((start, start + len)),
        }
    }
    ranges
}

const MIB: u64 = 1 << 20;

/// Data at [0, 1M) and [16M, 16M + 64k), a zeroed hole at [256k, 320k): cluster-aligned,
/// so the map is exact.
fn write_map_layout(uri: &str) -> Vec<(u64, u64)> {
    qemu_io(
        uri,
        &[
            "write -P 0x21 0 1M",
            "write -z 256k 64k",
            "write -P 0x22 16M 64k",
        ],
    );
    vec![
        (0, 256 << 10),
        (320 << 10, MIB),
        (16 * MIB, 16 * MIB + (64 << 10)),
    ]
}

#[test]
fn qemu_img_map_shows_data_where_written_and_zeros_elsewhere() {
    require!("qemu-io", "qemu-img");
    let d = Daemon::start("nbd-map");
    let uri = d.uri("vol0");
    let expected = write_map_layout(&uri);
    let out = check(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw", &uri]));
    let map: Vec<Value> = serde_json::from_str(&out).unwrap();
    let covered: u64 = map.iter().map(|e| e["length"].as_u64().unwrap()).sum();
    assert_eq!(covered, 4 * GIB, "{out}");
    for e in &map {
        assert_eq!(
            e["zero"].as_bool(),
            Some(!e["data"].as_bool().unwrap()),
            "{e}"
        );
    }
    let got = data_ranges(map.iter().map(|e| {
        (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
        )
    }));
    assert_eq!(got, expected, "{out}");
}

#[test]
fn nbdinfo_json_reports_size_block_sizes_and_base_allocation() {
    require!("nbdinfo");
    let d = Daemon::start("nbdinfo-json");
    let out = check(Command::new("nbdinfo").args(["--json", &d.uri("vol0")]));
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["protocol"], "newstyle-fixed", "{out}");
    assert_eq!(info["structured"], true, "{out}");
    let e = &info["exports"][0];
    assert_eq!(e["export-name"], "vol0", "{out}");
    assert_eq!(e["export-size"], 4 * GIB, "{out}");
    assert_eq!(e["block_size_minimum"], 4096, "{out}");
    assert_eq!(e["block_size_preferred"], 4096, "{out}");
    assert_eq!(e["block_size_maximum"], 32 * MIB, "{out}");
    assert_eq!(e["is_read_only"], false, "{out}");
    for flag in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_df",
        "can_cache",
    ] {
        assert_eq!(e[flag], true, "{flag}: {out}");
    }
    let contexts: Vec<&str> = e["contexts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(contexts.contains(&"base:allocation"), "{out}");
}

#[test]
fn nbdinfo_list_shows_volumes_created_by_the_cli() {
    require!("nbdinfo");
    let d = Daemon::start("nbdinfo-list");
    d.cli_ok(&["volume", "create", "small", "512M", "--block-size", "512"]);
    let out = check(Command::new("nbdinfo").args(["--json", "--list", &d.uri("")]));
    let info: Value = serde_json::from_str(&out).unwrap();
    let exports = info["exports"].as_array().unwrap();
    let small = exports
        .iter()
        .find(|e| e["export-name"] == "small")
        .unwrap_or_else(|| panic!("no export 'small': {out}"));
    assert_eq!(small["export-size"], 512 * MIB, "{out}");
    assert_eq!(small["block_size_minimum"], 512, "{out}");
    assert!(exports.iter().any(|e| e["export-name"] == "vol0"), "{out}");
}

#[test]
fn nbdinfo_map_lists_data_and_holes() {
    require!("nbdinfo", "qemu-io");
    let d = Daemon::start("nbdinfo-map");
    let uri = d.uri("vol0");
    let expected = write_map_layout(&uri);
    let out = check(Command::new("nbdinfo").args(["--map", &uri]));
    // Lines: START LENGTH TYPE DESCRIPTION, e.g. "0  262144  0  data".
    let entries: Vec<(u64, u64, bool)> = out
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind: u32 = f[2].parse().unwrap();
            (f[0].parse().unwrap(), f[1].parse().unwrap(), kind & 1 == 0)
        })
        .collect();
    assert_eq!(entries.iter().map(|e| e.1).sum::<u64>(), 4 * GIB, "{out}");
    assert_eq!(data_ranges(entries.into_iter()), expected, "{out}");
}

#[test]
fn nbdcopy_out_matches_what_was_copied_in() {
    require!("nbdcopy");
    let d = Daemon::start("nbdcopy");
    d.cli_ok(&["volume", "create", "img", "24M"]);
    let dir = TestDir::new("nbdcopy-files");
    // Random data with zero runs, so the copy exercises both data and holes.
    let mut image = common::pseudo_random(24 << 20, 0x7e55e1);
    image[(3 << 20)..(9 << 20)].fill(0);
    image[(20 << 20)..(20 << 20) + 4096].fill(0);
    let src = dir.join("in.img");
    std::fs::write(&src, &image).unwrap();
    let uri = d.uri("img");
    check(Command::new("nbdcopy").arg(&src).arg(&uri));
    let dst = dir.join("out.img");
    check(Command::new("nbdcopy").arg(&uri).arg(&dst));
    let copied = std::fs::read(&dst).unwrap();
    assert_eq!(copied.len(), image.len());
    assert_eq!(common::checksum(&copied), common::checksum(&image));
}

#[test]
fn nbdcopy_of_a_snapshot_matches_the_volume_when_it_was_taken() {
    require!("nbdcopy", "qemu-io");
    let d = Daemon::start("nbdcopy-snap");
    d.cli_ok(&["volume", "create", "img", "16M"]);
    let dir = TestDir::new("nbdcopy-snap-files");
    let image = common::pseudo_random(16 << 20, 0x5a95);
    let src = dir.join("in.img");
    std::fs::write(&src, &image).unwrap();
    let uri = d.uri("img");
    check(Command::new("nbdcopy").arg(&src).arg(&uri));
    d.cli_ok(&["snapshot", "create", "img", "before"]);
    d.cli_ok(&["export", "add", "img@before"]);
    // Change the live volume after the snapshot.
    qemu_io(&uri, &["write -P 0xee 0 1M", "write -z 8M 4M"]);
    let snap = dir.join("snap.img");
    check(Command::new("nbdcopy").arg(d.uri("img@before")).arg(&snap));
    let copied = std::fs::read(&snap).unwrap();
    assert_eq!(common::checksum(&copied), common::checksum(&image));
    let live = dir.join("live.img");
    check(Command::new("nbdcopy").arg(&uri).arg(&live));
    let mut expected = image;
    expected[..1 << 20].fill(0xee);
    expected[8 << 20..12 << 20].fill(0);
    assert_eq!(
        common::checksum(&std::fs::read(&live).unwrap()),
        common::checksum(&expected)
    );
    // The snapshot export is read-only.
    let out =
        run(Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 4k", &d.uri("img@before")]));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() || text.contains("failed"),
        "write to a snapshot: {text}"
    );
}

#[test]
fn fio_crc32c_verify_passes() {
    require!("fio");
    let d = Daemon::start("fio");
    let dir = TestDir::new("fio-cwd");
    let out = check(Command::new("fio").current_dir(&dir.path).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", d.uri("vol0")),
        "--rw=randwrite",
        "--bs=4k",
        "--size=64M",
        "--iodepth=16",
        "--runtime=3",
        "--verify=crc32c",
        // Verify while writing: when the 3 s run out before the 64 MiB are written, fio
        // skips the final verify pass.
        "--verify_backlog=512",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]));
    let start = out
        .find('{')
        .unwrap_or_else(|| panic!("fio printed no JSON: {out}"));
    let report: Value = serde_json::from_str(&out[start..]).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{out}");
    assert!(job["write"]["io_bytes"].as_u64().unwrap() > 0, "{out}");
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap() > 0,
        "fio verified nothing: {out}"
    );
}

/// nbdsh (python3-libnbd) script: strict mode off so libnbd sends what it is asked to.
const BAD_REQUESTS: &str = r#"
import errno, nbd, os
uri = os.environ["TESSEL_URI"]

def expect_error(what, errnos, f):
    try:
        f()
    except nbd.Error as e:
        # nbd.Error: errnum is the number, errno its name.
        assert e.errnum in errnos, "%s: %s, expected %s (%s)" % (what, e.errno, errnos, e)
        return
    raise AssertionError("%s: succeeded" % what)

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri)
size = h.get_size()
expect_error("read past the end", (errno.EINVAL, errno.ENOSPC), lambda: h.pread(4096, size))
expect_error("read across the end", (errno.EINVAL, errno.ENOSPC), lambda: h.pread(8192, size - 4096))
expect_error("write past the end", (errno.ENOSPC,), lambda: h.pwrite(b"x" * 4096, size))
expect_error("misaligned read", (errno.EINVAL,), lambda: h.pread(512, 100))
expect_error("misaligned write", (errno.EINVAL,), lambda: h.pwrite(b"y" * 4096, 512))
expect_error("short write", (errno.EINVAL,), lambda: h.pwrite(b"y" * 100, 0))
expect_error("zero-length read", (errno.EINVAL,), lambda: h.pread(0, 0))
# The same connection still works after the errors.
h.pwrite(b"\xab" * 4096, 8192)
assert h.pread(4096, 8192) == b"\xab" * 4096
h.shutdown()

bad = nbd.NBD()
try:
    bad.connect_uri(uri.rsplit("/", 1)[0] + "/no-such-volume")
except nbd.Error as e:
    print("unknown export refused:", e)
else:
    raise AssertionError("connecting to an unknown export succeeded")

# A new connection is served, and sees the write above.
g = nbd.NBD()
g.connect_uri(uri)
assert g.pread(4096, 8192) == b"\xab" * 4096
g.shutdown()
print("ok")
"#;

#[test]
fn nbdsh_bad_requests_get_errors_and_the_daemon_stays_healthy() {
    require!("nbdsh");
    let Some(mut nbdsh) = common::nbdsh() else {
        common::skip(
            module_path!(),
            "nbdsh cannot import the libnbd python module (python3-libnbd)",
        );
        return;
    };
    let mut d = Daemon::start("nbdsh");
    let out = check(
        nbdsh
            .env("TESSEL_URI", d.uri("vol0"))
            .args(["-c", BAD_REQUESTS]),
    );
    assert!(out.contains("unknown export refused"), "{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
    assert!(d.healthy(), "{}", d.stderr());
}

#[test]
fn garbage_closes_only_that_connection() {
    require!("qemu-io");
    let mut d = Daemon::start("nbd-garbage");
    let mut good = RawNbd::connect(&d.nbd_addr(), "vol0");
    good.write(0, &[0x5e; 4096]).unwrap();

    // Garbage instead of the client flags and options.
    let mut s = raw_nbd::greeted(&d.nbd_addr());
    s.write_all(&[0xff; 64]).unwrap();
    assert!(raw_nbd::closed_by_peer(&mut s), "handshake garbage");

    // A request with a bad magic in the transmission phase.
    let mut bad = RawNbd::connect(&d.nbd_addr(), "vol0");
    let mut req = bad.header(raw_nbd::CMD_WRITE, 0, 4096);
    req[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    bad.stream.write_all(&req).unwrap();
    let _ = bad.stream.write_all(&[0x66; 4096]);
    assert!(
        raw_nbd::closed_by_peer(&mut bad.stream),
        "bad request magic"
    );

    // A write longer than the 32 MiB the export advertises.
    let mut big = RawNbd::connect(&d.nbd_addr(), "vol0");
    let req = big.header(raw_nbd::CMD_WRITE, 0, 64 << 20);
    big.stream.write_all(&req).unwrap();
    let _ = big.stream.write_all(&[0x67; 4096]);
    assert!(raw_nbd::closed_by_peer(&mut big.stream), "oversized write");

    // The connection opened before all this keeps working, and so do new ones.
    assert_eq!(good.read(0, 4096).unwrap(), vec![0x5e; 4096]);
    good.write(4096, &[0x5f; 4096]).unwrap();
    good.flush().unwrap();
    qemu_io(&d.uri("vol0"), &["read -P 0x5e 0 4k", "read -P 0x5f 4k 4k"]);
    assert!(d.healthy(), "{}", d.stderr());
}

#[test]
fn client_disconnecting_mid_write_harms_nothing() {
    require!("qemu-io");
    let mut d = Daemon::start("nbd-midwrite");
    let uri = d.uri("vol0");
    qemu_io(&uri, &["write -P 0x42 0 2M"]);
    for _ in 0..3 {
        let mut c = RawNbd::connect(&d.nbd_addr(), "vol0");
        let req = c.header(raw_nbd::CMD_WRITE, 512 << 10, 1 << 20);
        c.stream.write_all(&req).unwrap();
        c.stream.write_all(&[0x99; 10]).unwrap();
        drop(c);
    }
    // Also a connection that goes away in the middle of the handshake.
    drop(raw_nbd::greeted(&d.nbd_addr()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.healthy(), "{}", d.stderr());
    qemu_io(&uri, &["read -P 0x42 0 2M"]);
    let out = run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x43 0 4k", &uri]));
    assert!(out.status.success());
    qemu_io(&uri, &["read -P 0x43 0 4k", "read -P 0x42 4k 2044k"]);
}

/// The daemon's resident memory in bytes (VmRSS).
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn unread_read_replies_stay_within_the_memory_budget() {
    use std::io::Read;
    const READS: u64 = 128;
    const LEN: u32 = 32 << 20;
    let d = Daemon::start("nbd-unread");
    let mut c = RawNbd::connect(&d.nbd_addr(), "vol0");
    // A tag at the start of every read's range, to check the replies carry the right data.
    for i in 0..READS {
        c.write(i * u64::from(LEN), &[i as u8 + 1; 4096]).unwrap();
    }
    let before = rss(d.pid());
    let mut requests = Vec::new();
    let mut offsets = std::collections::HashMap::new();
    for i in 0..READS {
        requests.extend(c.header(raw_nbd::CMD_READ, i * u64::from(LEN), LEN));
        offsets.insert(c.cookie(), i);
    }
    c.stream.write_all(&requests).unwrap();
    // Read nothing for a while: the daemon must hold the requests, not 4 GiB of replies.
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(rss(d.pid()));
    }
    let grown = peak.saturating_sub(before);
    common::say(&format!(
        "nbd: {READS} unread 32 MiB reads: daemon RSS grew {} MiB",
        grown >> 20
    ));
    assert!(grown < 512 << 20, "RSS grew {} MiB", grown >> 20);

    // Every reply arrives, complete and right, once the client reads.
    let mut data = vec![0u8; LEN as usize];
    for _ in 0..READS {
        let mut h = [0u8; 16];
        c.stream.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0, "errno");
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let i = offsets.remove(&cookie).expect("one reply per request");
        c.stream.read_exact(&mut data).unwrap();
        assert!(data[..4096].iter().all(|&b| b == i as u8 + 1), "read {i}");
        assert!(data[4096..].iter().all(|&b| b == 0), "read {i}");
    }
    assert!(offsets.is_empty());
}

/// `tessel serve` on `dir` with at most `nofile` open files; the caller stops it.
fn serve_with_nofile(dir: &std::path::Path, nofile: u64) -> (std::process::Child, u16) {
    use std::os::unix::process::CommandExt;
    let port = common::free_port();
    let socket = dir.join("tessel.sock");
    let mut cmd = common::serve_command(dir, port, &socket, &[]);
    let log = std::fs::File::create(dir.join("serve.log")).unwrap();
    // SAFETY: setrlimit(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: nofile,
                rlim_max: nofile,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !common::control_answers(&socket) {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

#[test]
fn the_control_socket_survives_fd_exhaustion() {
    let dir = TestDir::new("nbd-emfile");
    let (mut child, port) = serve_with_nofile(&dir.path, 200);
    let socket = dir.join("tessel.sock");
    let addr = format!("127.0.0.1:{port}");
    let held: Vec<std::net::TcpStream> = (0..250)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // While the daemon has no fd left, a control client waits or fails...
    let _ = common::control_answers(&socket);
    drop(held);
    // ... and once fds come back, the control socket answers again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !common::control_answers(&socket) {
        assert!(
            std::time::Instant::now() < deadline,
            "control socket dead after fd exhaustion"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = RawNbd::connect(&addr, "vol0");
    c.write(0, &[7; 4096]).unwrap();
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    let failures = log.matches("accept failed").count();
    assert!(failures < 20, "{failures} accept failures logged");
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = common::wait_timeout(&mut child, Duration::from_secs(60)).expect("stopped");
    assert!(status.success(), "{status}");
}

#[test]
fn a_client_that_never_finishes_the_handshake_is_closed() {
    let dir = TestDir::new("nbd-handshake");
    let config = dir.join("tessel.toml");
    std::fs::write(
        &config,
        include_str!("../config/tessel.toml")
            .replace("handshake_timeout = \"10s\"", "handshake_timeout = \"1s\""),
    )
    .unwrap();
    let d = Daemon::try_start(&dir.path, &["--config", config.to_str().unwrap()]).unwrap();
    let mut silent = raw_nbd::greeted(&d.nbd_addr());
    let started = std::time::Instant::now();
    assert!(raw_nbd::closed_by_peer(&mut silent));
    assert!(started.elapsed() < Duration::from_secs(5));
    // A client that goes through the handshake stays connected past the timeout.
    let mut c = RawNbd::connect(&d.nbd_addr(), "vol0");
    std::thread::sleep(Duration::from_millis(2500));
    c.write(0, &[1; 4096]).unwrap();
}
