//! Stopping and starting `tessel serve` on the same data directory: a graceful restart, a
//! second daemon on a pool in use, and a crash (SIGKILL) after a flush.

#[macro_use]
mod common;

use common::raw_nbd::{self, RawNbd};
use common::{qemu_io, Daemon, TestDir};
use std::io::Write;
use std::time::Duration;

#[test]
fn data_and_volumes_survive_a_graceful_restart() {
    require!("qemu-io");
    let dir = TestDir::new("restart-graceful");
    let mut d = Daemon::start_in(&dir.path);
    d.cli_ok(&["volume", "create", "extra", "1G"]);
    d.cli_ok(&["volume", "create", "tiny", "64M", "--block-size", "512"]);
    d.cli_ok(&["volume", "resize", "tiny", "128M"]);
    qemu_io(
        &d.uri("vol0"),
        &["write -P 0x42 0 1M", "write -P 0x43 3G 64k"],
    );
    qemu_io(&d.uri("extra"), &["write -P 0x44 4k 8k"]);
    d.cli_ok(&["snapshot", "create", "extra", "snap"]);
    qemu_io(&d.uri("extra"), &["write -P 0x45 4k 8k"]);
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", d.stderr());
    assert!(
        !d.socket.exists(),
        "the control socket is removed on a clean stop"
    );

    let d = Daemon::start_in(&dir.path);
    let list = d.cli_json(&["volume", "list"]);
    let sizes: Vec<(String, u64, u64)> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["size"].as_u64().unwrap(),
                v["block_size"].as_u64().unwrap(),
            )
        })
        .collect();
    for want in [
        ("vol0".to_string(), 4 << 30, 4096),
        ("extra".to_string(), 1 << 30, 4096),
        ("tiny".to_string(), 128 << 20, 512),
    ] {
        assert!(sizes.contains(&want), "{want:?} not in {list}");
    }
    qemu_io(
        &d.uri("vol0"),
        &[
            "read -P 0x42 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x43 3G 64k",
        ],
    );
    qemu_io(
        &d.uri("extra"),
        &["read -P 0 0 4k", "read -P 0x45 4k 8k", "read -P 0 12k 52k"],
    );
    let snaps = d.cli_json(&["snapshot", "list", "extra"]);
    assert_eq!(snaps["snapshots"][0]["name"], "snap", "{snaps}");
    d.cli_ok(&["export", "add", "extra@snap"]);
    common::qemu_io_read_only(&d.uri("extra@snap"), &["read -P 0x44 4k 8k"]);
}

#[test]
fn second_daemon_on_the_same_data_dir_is_refused() {
    let dir = TestDir::new("restart-twice");
    let mut first = Daemon::start_in(&dir.path);
    // Another port and control socket, so only the pool itself can be what refuses it.
    let other = dir.join("other.sock");
    let out = common::run_timeout(
        &mut common::serve_command(&dir.path, common::free_port(), &other, &[]),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second daemon started:\n{stderr}");
    assert!(
        stderr.contains("in use by another process"),
        "the refusal should say why:\n{stderr}"
    );
    assert!(
        stderr.contains("pool0.img"),
        "the refusal should name the pool device:\n{stderr}"
    );
    assert!(first.healthy(), "{}", first.stderr());
    assert!(first.stop().success());
}

#[test]
fn flushed_writes_survive_kill_9() {
    require!("qemu-io");
    let dir = TestDir::new("restart-crash");
    let mut d = Daemon::start_in(&dir.path);
    d.cli_ok(&["volume", "create", "crash", "2G"]);
    // qemu-io also flushes when it closes; the explicit flush is what the test relies on.
    qemu_io(
        &d.uri("crash"),
        &[
            "write -P 0x61 0 4M",
            "write -P 0x62 1023M 2M",
            "write -z 1M 64k",
            "flush",
        ],
    );
    // FUA: durable without a flush (qemu-io -f sends NBD_CMD_FLAG_FUA).
    qemu_io(&d.uri("vol0"), &["write -f -P 0x63 8M 64k"]);
    d.kill9();

    let d = Daemon::start_in(&dir.path);
    assert!(
        d.cli_json(&["volume", "info", "crash"])["size"] == 2u64 << 30,
        "volume created before the crash is back"
    );
    qemu_io(
        &d.uri("crash"),
        &[
            "read -P 0x61 0 1M",
            "read -P 0 1M 64k",
            "read -P 0x61 1088k 3008k",
            "read -P 0x62 1023M 2M",
        ],
    );
    qemu_io(&d.uri("vol0"), &["read -P 0x63 8M 64k"]);
}

#[test]
fn sigterm_with_connected_clients_exits_cleanly_and_keeps_acknowledged_writes() {
    let dir = TestDir::new("restart-busy");
    let mut d = Daemon::start_in(&dir.path);
    let mut idle = RawNbd::connect(&d.nbd_addr(), "vol0");
    let mut writer = RawNbd::connect(&d.nbd_addr(), "vol0");
    writer.write(0, &[0x71; 65536]).unwrap();
    writer.flush().unwrap();
    // A request whose payload never finishes arriving when the signal comes.
    let req = writer.header(raw_nbd::CMD_WRITE, 1 << 20, 1 << 20);
    writer.stream.write_all(&req).unwrap();
    writer.stream.write_all(&[0x72; 100]).unwrap();
    let status = d.stop();
    assert!(status.success(), "SIGTERM exit: {status}\n{}", d.stderr());
    assert!(
        raw_nbd::closed_by_peer(&mut idle.stream),
        "idle client not disconnected"
    );
    assert!(
        raw_nbd::closed_by_peer(&mut writer.stream),
        "writer not disconnected"
    );

    let d = Daemon::start_in(&dir.path);
    let mut c = RawNbd::connect(&d.nbd_addr(), "vol0");
    assert_eq!(c.read(0, 65536).unwrap(), vec![0x71; 65536]);
    assert_eq!(c.read(1 << 20, 1 << 20).unwrap(), vec![0; 1 << 20]);
}
