//! The admin CLI against a running daemon: every implemented subcommand in human and
//! `--json` form, and the errors a user meets.

mod common;

use common::raw_nbd::RawNbd;
use common::{pseudo_random, Daemon, TestDir, TESSEL};
use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The command failed with a non-zero exit and one `tessel: ...` line; that line.
fn fails(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "succeeded: {stderr}");
    assert!(
        stderr.starts_with("tessel: ") && stderr.trim_end().lines().count() == 1,
        "not one clear line: {stderr:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr.trim_end().to_string()
}

/// A `--json` error: non-zero exit, `{"code", "message"}` on stdout; the code.
fn fails_json(out: &Output) -> String {
    fails(out);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("error is not JSON ({e}): {:?}", out.stdout));
    assert!(v["message"].is_string(), "{v}");
    v["code"].as_str().unwrap().to_string()
}

/// A command line refused by the argument parser (exit 2, before any daemon is asked).
fn refused_by_parser(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    stderr
}

fn volume<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
}

#[test]
fn volume_lifecycle_in_human_output() {
    let d = Daemon::start("cli-human");
    assert_eq!(
        d.cli_ok(&["volume", "create", "data", "2G"]),
        "created volume 'data': 2.0 GiB, 4096-byte blocks\n"
    );
    assert_eq!(
        d.cli_ok(&["volume", "create", "old", "512MiB", "--block-size", "512"]),
        "created volume 'old': 512.0 MiB, 512-byte blocks\n"
    );
    let list = d.cli_ok(&["volume", "list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "SIZE", "BLOCK", "ALLOCATED", "SNAPSHOTS", "ORIGIN"],
        "{list}"
    );
    for (name, row) in [
        ("data", "data 2.0 GiB 4096 0 B 0 -"),
        ("old", "old 512.0 MiB 512 0 B 0 -"),
        ("vol0", "vol0 4.0 GiB 4096 0 B 0 -"),
    ] {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {list}"));
        assert_eq!(line.split_whitespace().collect::<Vec<_>>().join(" "), row);
    }
    assert_eq!(
        d.cli_ok(&["volume", "resize", "data", "3G"]),
        "resized volume 'data' to 3.0 GiB\n"
    );
    assert_eq!(
        d.cli_ok(&["volume", "info", "data"]),
        "name:       data\n\
         size:       3.0 GiB (3221225472 bytes)\n\
         block size: 4096\n\
         allocated:  0 B\n\
         origin:     -\n\
         snapshots:  -\n"
    );
    assert_eq!(
        d.cli_ok(&["volume", "delete", "data"]),
        "deleted volume 'data'\n"
    );
    assert!(!d.cli_ok(&["volume", "list"]).contains("data"));
}

#[test]
fn volume_lifecycle_in_json_output() {
    let d = Daemon::start("cli-json");
    let v = d.cli_json(&["volume", "create", "data", "1G", "--block-size", "512"]);
    assert_eq!(v["name"], "data");
    assert_eq!(v["size"], 1u64 << 30);
    assert_eq!(v["block_size"], 512);
    assert_eq!(v["allocated_bytes"], 0);
    assert_eq!(v["origin"], Value::Null);
    assert_eq!(v["snapshots"], serde_json::json!([]));
    let list = d.cli_json(&["volume", "list"]);
    assert_eq!(volume(&list, "data"), Some(&v), "{list}");
    assert_eq!(volume(&list, "vol0").unwrap()["size"], 4u64 << 30);
    let v = d.cli_json(&["volume", "resize", "data", "1536M"]);
    assert_eq!(v["size"], 1536u64 << 20);
    assert_eq!(d.cli_json(&["volume", "info", "data"]), v);
    assert_eq!(
        d.cli_json(&["volume", "delete", "data"]),
        serde_json::json!({})
    );
    assert_eq!(
        volume(&d.cli_json(&["volume", "list"]), "data"),
        None,
        "deleted volume still listed"
    );
}

#[test]
fn allocated_space_follows_writes() {
    let d = Daemon::start("cli-alloc");
    let mut c = common::raw_nbd::RawNbd::connect(&d.nbd_addr(), "vol0");
    c.write(0, &[1; 4096]).unwrap();
    c.write(1 << 30, &[2; 8192]).unwrap();
    c.flush().unwrap();
    let v = d.cli_json(&["volume", "info", "vol0"]);
    // Two clusters touched: at least two blocks, at most two 1 MiB clusters.
    let allocated = v["allocated_bytes"].as_u64().unwrap();
    assert!((12288..=2 << 20).contains(&allocated), "{v}");
    let stats = d.cli_json(&["stats"]);
    assert!(
        stats["pool"]["used_bytes"].as_u64().unwrap() >= allocated,
        "{stats}"
    );
}

#[test]
fn stats_show_cores_and_pool_space() {
    let d = Daemon::start("cli-stats");
    let text = d.cli_ok(&["stats"]);
    assert!(
        text.starts_with("CORE  READ IOPS  WRITE IOPS"),
        "no per-core table: {text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pool: ") && l.contains("total") && l.contains("free")),
        "no pool line: {text}"
    );
    let s = d.cli_json(&["stats"]);
    let cores = s["cores"].as_array().unwrap();
    assert!(!cores.is_empty(), "{s}");
    for c in cores {
        for key in [
            "core",
            "read_iops",
            "write_iops",
            "read_mib_s",
            "write_mib_s",
            "lat_us_p50",
            "lat_us_p99",
            "queue_depth",
        ] {
            assert!(c[key].is_number(), "{key} missing: {s}");
        }
    }
    let pool = &s["pool"];
    let total = pool["total_bytes"].as_u64().unwrap();
    let used = pool["used_bytes"].as_u64().unwrap();
    assert!(total > 0 && used <= total, "{s}");
    assert_eq!(pool["free_bytes"].as_u64().unwrap(), total - used, "{s}");
    assert!(s["jobs"].is_array(), "{s}");
}

#[test]
fn export_list_shows_every_volume_read_write() {
    let d = Daemon::start("cli-exports");
    d.cli_ok(&["volume", "create", "extra", "64M", "--block-size", "512"]);
    let text = d.cli_ok(&["export", "list"]);
    let rows: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(rows[0], "NAME SIZE BLOCK MODE CONNECTIONS", "{text}");
    assert!(rows.contains(&"extra 64.0 MiB 512 rw 0".into()), "{text}");
    assert!(rows.contains(&"vol0 4.0 GiB 4096 rw 0".into()), "{text}");
    let list = d.cli_json(&["export", "list"]);
    let extra = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "extra")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(extra["size"], 64u64 << 20);
    assert_eq!(extra["block_size"], 512);
    assert_eq!(extra["read_only"], false);
    assert!(extra["connections"].is_number());
}

#[test]
fn daemon_not_running_is_a_clear_error() {
    let dir = TestDir::new("cli-nodaemon");
    let socket = dir.join("tessel.sock");
    let out = common::cli(&socket, &["volume", "list"]);
    let line = fails(&out);
    assert!(line.contains(&socket.display().to_string()), "{line}");
    assert!(line.contains("is `tessel serve` running?"), "{line}");
    // A stale socket file with nobody behind it says the same.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    let line = fails(&common::cli(&socket, &["--json", "stats"]));
    assert!(line.contains("is `tessel serve` running?"), "{line}");
}

#[test]
fn cli_finds_the_daemon_through_tessel_socket_and_the_default_path() {
    let dir = TestDir::new("cli-find");
    // The default socket is tessel-data/tessel.sock under the current directory.
    let d = Daemon::start_in(&dir.join("tessel-data"));
    let out = common::run(
        Command::new(TESSEL)
            .args(["volume", "list"])
            .current_dir(&dir.path)
            .env_remove("TESSEL_SOCKET"),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vol0"));
    let out = common::run(
        Command::new(TESSEL)
            .args(["volume", "list"])
            .current_dir(std::env::temp_dir())
            .env("TESSEL_SOCKET", &d.socket),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("vol0"));
}

#[test]
fn unknown_volume_is_an_error() {
    let d = Daemon::start("cli-unknown");
    for args in [
        &["volume", "info", "nope"][..],
        &["volume", "resize", "nope", "8G"],
        &["volume", "delete", "nope"],
    ] {
        assert_eq!(
            fails(&d.cli(args)),
            "tessel: unknown volume 'nope'",
            "{args:?}"
        );
        let mut json = vec!["--json"];
        json.extend_from_slice(args);
        assert_eq!(fails_json(&d.cli(&json)), "unknown_volume", "{args:?}");
    }
}

#[test]
fn bad_sizes_are_refused() {
    let d = Daemon::start("cli-size");
    for size in ["4Q", "0", "1.5.G", "lots", ""] {
        let stderr = refused_by_parser(&d.cli(&["volume", "create", "v", size]));
        assert!(
            stderr.contains("expected a size like 4G") || stderr.contains("more than 0"),
            "{size}: {stderr}"
        );
    }
    let stderr =
        refused_by_parser(&d.cli(&["volume", "create", "v", "1G", "--block-size", "1000"]));
    assert!(stderr.contains("expected 512 or 4096"), "{stderr}");
    // Not a multiple of the block size, and shrinking: the daemon refuses.
    let line = fails(&d.cli(&["volume", "create", "v", "4097"]));
    assert!(line.contains("size"), "{line}");
    let code = fails_json(&d.cli(&["--json", "volume", "resize", "vol0", "1G"]));
    assert_eq!(code, "invalid_argument");
    let list = d.cli_json(&["volume", "list"]);
    assert!(volume(&list, "v").is_none(), "{list}");
    assert_eq!(volume(&list, "vol0").unwrap()["size"], 4u64 << 30);
}

#[test]
fn duplicate_name_is_refused() {
    let d = Daemon::start("cli-dup");
    d.cli_ok(&["volume", "create", "twice", "1G"]);
    assert_eq!(
        fails(&d.cli(&["volume", "create", "twice", "2G"])),
        "tessel: 'twice' already exists"
    );
    assert_eq!(
        fails_json(&d.cli(&["--json", "volume", "create", "vol0", "1G"])),
        "already_exists"
    );
    let info = d.cli_json(&["volume", "info", "twice"]);
    assert_eq!(info["size"], 1u64 << 30, "the first volume is untouched");
}

#[test]
fn bad_volume_names_are_refused() {
    let d = Daemon::start("cli-names");
    for name in ["a@b", "a/b", "a b", ".", ".."] {
        let code = fails_json(&d.cli(&["--json", "volume", "create", name, "1G"]));
        assert_eq!(code, "invalid_argument", "{name}");
    }
    // A name the CLI would read as an option, sent as the control request itself.
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.write_all(b"{\"op\":\"volume_create\",\"name\":\"-x\",\"size\":1073741824}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    assert!(line.contains("invalid_argument"), "{line}");
    let code = fails_json(&d.cli(&["--json", "snapshot", "create", "vol0", ".."]));
    assert_eq!(code, "invalid_argument");
}

#[test]
fn rollback_counts_only_the_connections_of_its_volume() {
    let d = Daemon::start("cli-rollback-use");
    d.cli_ok(&["volume", "create", "other", "64M"]);
    d.cli_ok(&["snapshot", "create", "vol0", "base"]);
    let _other = common::raw_nbd::RawNbd::connect(&d.nbd_addr(), "other");
    assert_eq!(
        d.cli_ok(&["volume", "rollback", "vol0", "base"]),
        "rolled back volume 'vol0' to snapshot 'base'\n"
    );
    let _mine = common::raw_nbd::RawNbd::connect(&d.nbd_addr(), "vol0");
    assert_eq!(
        fails_json(&d.cli(&["--json", "volume", "rollback", "vol0", "base"])),
        "in_use"
    );
}

#[test]
fn sighup_and_sigusr1_leave_the_daemon_running() {
    let mut d = Daemon::start("cli-signals");
    for sig in [libc::SIGHUP, libc::SIGUSR1] {
        // SAFETY: kill(2) on the daemon, our own unreaped child.
        unsafe { libc::kill(d.pid(), sig) };
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(d.healthy(), "{}", d.stderr());
    assert!(d.stop().success(), "{}", d.stderr());
}

#[test]
fn clone_create_without_at_is_refused() {
    let d = Daemon::start("cli-clone-at");
    for bad in ["vol0", "@snap", "vol0@"] {
        let stderr = refused_by_parser(&d.cli(&["clone", "create", bad, "copy"]));
        assert!(stderr.contains("is not VOLUME@SNAPSHOT"), "{bad}: {stderr}");
    }
}

#[test]
fn snapshot_create_list_delete_in_human_and_json_output() {
    let d = Daemon::start("cli-snap");
    let mut c = common::raw_nbd::RawNbd::connect(&d.nbd_addr(), "vol0");
    c.write(0, &[1; 65536]).unwrap();
    c.flush().unwrap();
    drop(c);
    let line = d.cli_ok(&["snapshot", "create", "vol0", "s1"]);
    assert!(
        line.starts_with("created snapshot 'vol0@s1' (epoch "),
        "{line}"
    );
    let s2 = d.cli_json(&["snapshot", "create", "vol0", "s2"]);
    assert_eq!(
        (&s2["volume"], &s2["name"]),
        (&"vol0".into(), &"s2".into()),
        "{s2}"
    );
    for key in [
        "created_unix",
        "epoch",
        "allocated_bytes",
        "exclusive_bytes",
        "shared_bytes",
    ] {
        assert!(s2[key].is_u64(), "{key}: {s2}");
    }
    let table = d.cli_ok(&["snapshot", "list"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["VOLUME", "NAME", "CREATED"], "{table}");
    assert_eq!((rows[1][0], rows[1][1]), ("vol0", "s1"), "{table}");
    assert_eq!((rows[2][0], rows[2][1]), ("vol0", "s2"), "{table}");
    let list = d.cli_json(&["snapshot", "list", "vol0"]);
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"], "{list}");
    assert_eq!(
        d.cli_json(&["volume", "info", "vol0"])["snapshots"],
        serde_json::json!(["s1", "s2"])
    );
    assert_eq!(
        fails_json(&d.cli(&["--json", "snapshot", "create", "vol0", "s1"])),
        "already_exists"
    );
    assert_eq!(
        fails_json(&d.cli(&["--json", "snapshot", "delete", "vol0", "nope"])),
        "unknown_snapshot"
    );
    assert_eq!(
        fails_json(&d.cli(&["--json", "snapshot", "create", "nope", "s"])),
        "unknown_volume"
    );
    assert_eq!(
        d.cli_ok(&["snapshot", "delete", "vol0", "s1"]),
        "deleted snapshot 'vol0@s1'\n"
    );
    assert_eq!(
        d.cli_json(&["snapshot", "delete", "vol0", "s2"]),
        serde_json::json!({})
    );
    let list = d.cli_json(&["snapshot", "list"]);
    assert_eq!(list["snapshots"], serde_json::json!([]), "{list}");
}

#[test]
fn clone_rollback_export_and_schedule_commands_work() {
    let d = Daemon::start("cli-clone");
    d.cli_ok(&["snapshot", "create", "vol0", "base"]);
    assert_eq!(
        d.cli_ok(&["clone", "create", "vol0@base", "work"]),
        "created clone 'work' of 'vol0@base'\n"
    );
    assert_eq!(
        d.cli_json(&["volume", "info", "work"])["origin"],
        "vol0@base"
    );
    assert_eq!(
        fails_json(&d.cli(&["--json", "clone", "create", "vol0@nope", "w2"])),
        "unknown_snapshot"
    );
    let job = d.cli_json(&["clone", "inflate", "work", "--wait"]);
    assert_eq!(job["finished"], true, "{job}");
    assert_eq!(
        d.cli_json(&["volume", "info", "work"])["origin"],
        Value::Null
    );

    assert_eq!(
        d.cli_ok(&["volume", "rollback", "vol0", "base"]),
        "rolled back volume 'vol0' to snapshot 'base'\n"
    );

    assert_eq!(
        d.cli_ok(&["export", "add", "vol0@base"]),
        "exporting 'vol0@base' (read-only, 4.0 GiB)\n"
    );
    let list = d.cli_json(&["export", "list"]);
    let snap = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "vol0@base")
        .unwrap_or_else(|| panic!("{list}"));
    assert_eq!(snap["read_only"], true);
    assert_eq!(
        d.cli_ok(&["export", "remove", "vol0@base"]),
        "stopped exporting 'vol0@base'\n"
    );
    let code = fails_json(&d.cli(&["--json", "export", "add", "vol0@nope"]));
    assert!(
        code == "unknown_export" || code == "unknown_snapshot",
        "{code}"
    );

    let before = unix_now();
    assert_eq!(
        d.cli_ok(&["schedule", "set", "vol0", "--every", "1h", "--keep", "3"]),
        "snapshotting 'vol0' every 1h, keeping 3\n"
    );
    let after = unix_now();
    let list = d.cli_json(&["schedule", "list"]);
    let s = &list["schedules"][0];
    assert_eq!(
        (&s["volume"], &s["every_secs"], &s["keep"]),
        (&"vol0".into(), &3600.into(), &3.into()),
        "{list}"
    );
    // The next run is an hour after the set, and the human list counts down to it from
    // when it ran, however slow this machine is.
    let next = s["next_unix"].as_u64().unwrap();
    assert!((before + 3600..=after + 3600).contains(&next), "{list}");
    let t0 = unix_now();
    let human = d.cli_ok(&["schedule", "list"]);
    let t1 = unix_now();
    let shown = remaining_shown(&human);
    assert!(
        (next.saturating_sub(t1 + 1)..=next - t0).contains(&shown),
        "shows {shown} s left, next run at {next}, listed between {t0} and {t1}:\n{human}"
    );
    assert_eq!(
        d.cli_ok(&["schedule", "set", "vol0", "--every", "1h", "--keep", "0"]),
        "removed the schedule of 'vol0'\n"
    );
    assert_eq!(
        d.cli_json(&["schedule", "list"])["schedules"],
        serde_json::json!([])
    );
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The seconds in the `(in 59m 58s)` of a `schedule list` table.
fn remaining_shown(table: &str) -> u64 {
    let at = table
        .find("(in ")
        .unwrap_or_else(|| panic!("no '(in ': {table}"))
        + 4;
    let text = &table[at..at + table[at..].find(')').unwrap()];
    text.split(' ')
        .map(|part| {
            let (n, unit) = part.split_at(part.len() - 1);
            let per = match unit {
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                "d" => 86400,
                _ => panic!("unit in {text:?}"),
            };
            n.parse::<u64>().unwrap() * per
        })
        .sum()
}

#[test]
fn rollback_is_refused_while_a_host_is_connected_and_forced_with_force() {
    let d = Daemon::start("cli-rollback-busy");
    let old = pseudo_random(64 << 10, 1);
    let new = pseudo_random(64 << 10, 2);
    let mut host = RawNbd::connect(&d.nbd_addr(), "vol0");
    host.write(0, &old).unwrap();
    host.flush().unwrap();
    d.cli_ok(&["snapshot", "create", "vol0", "base"]);
    host.write(0, &new).unwrap();

    let out = d.cli(&["--json", "volume", "rollback", "vol0", "base"]);
    assert_eq!(fails_json(&out), "in_use");
    let message: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        message["message"].as_str().unwrap().contains("--force"),
        "{message}"
    );
    assert!(
        host.read(0, 64 << 10).unwrap() == new,
        "a refused rollback changed the volume"
    );

    assert_eq!(
        d.cli_ok(&["volume", "rollback", "vol0", "base", "--force"]),
        "rolled back volume 'vol0' to snapshot 'base'\n"
    );
    assert!(
        host.read(0, 64 << 10).unwrap() == old,
        "forced rollback did not happen"
    );

    // Once the host is gone, no --force is needed (the daemon notices the close soon).
    host.write(0, &new).unwrap();
    drop(host);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = d.cli(&["--json", "volume", "rollback", "vol0", "base"]);
        if out.status.success() {
            break;
        }
        assert_eq!(fails_json(&out), "in_use");
        assert!(
            Instant::now() < deadline,
            "rollback still refused 30 s after the host left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut host = RawNbd::connect(&d.nbd_addr(), "vol0");
    assert!(
        host.read(0, 64 << 10).unwrap() == old,
        "rollback did not happen"
    );
}

/// Names of `vol0`'s snapshots, in the daemon's order.
fn snapshot_names(d: &Daemon) -> Vec<String> {
    d.cli_json(&["snapshot", "list", "vol0"])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn scheduled_snapshots_are_taken_and_expired_oldest_first_and_hand_made_ones_kept() {
    let d = Daemon::start("cli-schedule-run");
    d.cli_ok(&["snapshot", "create", "vol0", "by-hand"]);
    // One a second (the smallest interval), keeping two.
    d.cli_ok(&["schedule", "set", "vol0", "--every", "1s", "--keep", "2"]);
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 5 {
        let names = snapshot_names(&d);
        assert!(
            names.contains(&"by-hand".to_string()),
            "hand-made snapshot gone: {names:?}"
        );
        let autos: Vec<&String> = names.iter().filter(|n| n.starts_with("auto-")).collect();
        // Between a create and its expiry the list may hold one more than `keep`.
        assert!(autos.len() <= 3, "not expired: {names:?}");
        seen.extend(autos.into_iter().cloned());
        assert!(
            Instant::now() < deadline,
            "only {} scheduled snapshots in 60 s: {seen:?}",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    d.cli_ok(&["schedule", "set", "vol0", "--every", "1s", "--keep", "0"]);
    // A run in progress when the schedule was removed finishes; then nothing changes.
    std::thread::sleep(Duration::from_millis(1500));
    let names = snapshot_names(&d);
    seen.extend(names.iter().filter(|n| n.starts_with("auto-")).cloned());
    let mut autos: Vec<String> = names
        .iter()
        .filter(|n| n.starts_with("auto-"))
        .cloned()
        .collect();
    autos.sort();
    // Names are UTC times: the two kept are the two newest ever taken.
    let newest: Vec<String> = seen.iter().rev().take(2).rev().cloned().collect();
    assert_eq!(
        autos, newest,
        "expired not oldest first (all taken: {seen:?})"
    );
    assert!(names.contains(&"by-hand".to_string()), "{names:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(snapshot_names(&d), names, "a removed schedule still runs");
}

/// `tessel serve` on `data` with its control socket at `socket`, expected to refuse to
/// start: its stderr (a daemon that starts anyway is killed after a while and fails).
fn serve_refuses(data: &std::path::Path, socket: &std::path::Path) -> String {
    let mut cmd = common::serve_command(data, common::free_port(), socket, &[]);
    let out = common::run_timeout(&mut cmd, std::time::Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started: {stderr}");
    stderr
}

#[test]
fn a_control_socket_path_naming_a_pool_file_is_refused_and_the_file_kept() {
    let dir = TestDir::new("cli-sock-pool");
    let pool = dir.join("pool0.img");
    let mut d = Daemon::start_in(&dir.path);
    d.cli_ok(&["volume", "create", "kept", "64M"]);
    assert!(d.stop().success());
    let before = std::fs::metadata(&pool).unwrap();

    let stderr = serve_refuses(&dir.path, &pool);
    assert!(stderr.contains("is not a socket"), "{stderr}");
    let after = std::fs::metadata(&pool).expect("the pool file is still there");
    assert_eq!(
        (after.len(), std::os::unix::fs::MetadataExt::ino(&after)),
        (before.len(), std::os::unix::fs::MetadataExt::ino(&before))
    );
    let d = Daemon::start_in(&dir.path);
    assert!(d.cli_ok(&["volume", "list"]).contains("kept"));
}

#[test]
fn a_second_daemon_on_a_live_socket_fails_before_formatting_its_pool() {
    let d = Daemon::start("cli-sock-live");
    let other = TestDir::new("cli-sock-other");
    let stderr = serve_refuses(&other.path, &d.socket);
    assert!(stderr.contains("another tessel daemon answers"), "{stderr}");
    assert!(
        !other.join("pool0.img").exists(),
        "the refused daemon created or formatted a pool"
    );
    assert!(common::control_answers(&d.socket));
}

#[test]
fn data_directory_and_socket_are_private_under_umask_000() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = TestDir::new("cli-umask");
    let data = dir.join("data");
    let socket = data.join("tessel.sock");
    let mut cmd = common::serve_command(&data, common::free_port(), &socket, &[]);
    // SAFETY: umask(2) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !common::control_answers(&socket) {
        assert!(std::time::Instant::now() < deadline, "daemon did not start");
        assert!(child.try_wait().unwrap().is_none(), "daemon exited");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let (dir_mode, socket_mode) = (mode(&data), mode(&socket));
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = common::wait_timeout(&mut child, std::time::Duration::from_secs(60));
    assert_eq!(dir_mode, 0o700, "data directory mode {dir_mode:o}");
    assert_eq!(socket_mode, 0o600, "control socket mode {socket_mode:o}");
}

#[test]
fn idle_control_clients_cost_no_thread_each_and_long_lines_are_refused() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let d = Daemon::start("cli-idle");
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .count()
    };
    let before = threads();
    let idle: Vec<UnixStream> = (0..500)
        .map(|_| UnixStream::connect(&d.socket).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = threads();
    assert!(
        during < before + 10,
        "{before} threads before 500 idle clients, {during} with them"
    );
    assert!(d.cli_ok(&["volume", "list"]).contains("vol0"));

    // A line over the documented 16 MiB gets an error and the connection closes, before
    // the daemon buffers the rest.
    let mut long = UnixStream::connect(&d.socket).unwrap();
    long.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..17 {
        if long.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut line = String::new();
    BufReader::new(&long).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["code"], "bad_request", "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("longer than"),
        "{v}"
    );
    drop(idle);
    assert!(d.cli_ok(&["volume", "list"]).contains("vol0"));
}

#[test]
fn one_control_connection_answers_several_requests_one_line_each() {
    use std::io::{BufRead, BufReader, Read, Write};
    let d = Daemon::start("cli-control-lines");
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    // One at a time, as a client that waits for each answer does.
    for name in ["a", "b"] {
        let req = format!("{{\"op\":\"volume_create\",\"name\":\"{name}\",\"size\":1048576}}\n");
        s.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert_eq!(v["status"], "ok", "{v}");
        assert_eq!(v["data"]["name"], name, "{v}");
    }
    // Pipelined: three requests in one write, three answers in order, nothing else.
    s.write_all(
        b"{\"op\":\"volume_info\",\"name\":\"a\"}\n{\"op\":\"volume_info\",\"name\":\"nope\"}\n{\"op\":\"volume_info\",\"name\":\"b\"}\n",
    )
    .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        answers
            .push(serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")));
    }
    assert_eq!(answers[0]["data"]["name"], "a");
    assert_eq!(answers[1]["code"], "unknown_volume");
    assert_eq!(answers[2]["data"]["name"], "b");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "bytes after the last answer: {rest:?}");
}
