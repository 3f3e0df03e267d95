//! Operating a running daemon safely: destructive commands against connected hosts,
//! protected and scheduled snapshots (recorded in the pool, surviving restarts), and the
//! sessions an operator sees and closes. Real daemon; NBD and iSCSI hosts connect by hand.

mod common;

use common::raw_iscsi::{self, RawIscsi};
use common::raw_nbd::{self, RawNbd};
use common::{Daemon, TestDir};
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};

/// A `--json` error: non-zero exit and `{"code", "message"}` on stdout; the code.
fn code(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("error is not JSON ({e}): {:?}", out.stdout));
    v["code"].as_str().unwrap().to_string()
}

/// The snapshots of `volume`: (name, scheduled, protected), oldest first.
fn snapshots(d: &Daemon, volume: &str) -> Vec<(String, bool, bool)> {
    d.cli_json(&["snapshot", "list", volume])["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["scheduled"].as_bool().unwrap(),
                s["protected"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn names(d: &Daemon, volume: &str) -> Vec<String> {
    snapshots(d, volume).into_iter().map(|s| s.0).collect()
}

/// Wait until `f` holds, polling; panics with `what` after `limit`.
fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sessions the daemon lists.
fn sessions(d: &Daemon) -> Vec<Value> {
    d.cli_json(&["session", "list"])["sessions"]
        .as_array()
        .unwrap()
        .clone()
}

fn connections(d: &Daemon, export: &str) -> u64 {
    d.cli_json(&["export", "list"])["exports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == export)
        .unwrap_or_else(|| panic!("no export {export}"))["connections"]
        .as_u64()
        .unwrap()
}

#[test]
fn schedules_expire_only_snapshots_they_took_whatever_the_names_and_never_protected_ones() {
    let dir = TestDir::new("ops-schedule-flags");
    let mut d = Daemon::start_in(&dir.path);
    // Hand-made snapshots with names a schedule could have given.
    d.cli_ok(&["snapshot", "create", "vol0", "auto-20000101T000000Z"]);
    d.cli_ok(&["snapshot", "create", "vol0", "auto-mine"]);
    d.cli_ok(&["schedule", "set", "vol0", "--every", "1s", "--keep", "1"]);
    let scheduled = |d: &Daemon| -> Vec<String> {
        snapshots(d, "vol0")
            .into_iter()
            .filter(|s| s.1)
            .map(|s| s.0)
            .collect()
    };
    // Let it take and expire a few.
    let mut seen = std::collections::BTreeSet::new();
    wait_for(Duration::from_secs(60), "3 scheduled snapshots", || {
        seen.extend(scheduled(&d));
        seen.len() >= 3
    });
    let all = names(&d, "vol0");
    for hand in ["auto-20000101T000000Z", "auto-mine"] {
        assert!(all.contains(&hand.to_string()), "{hand} deleted: {all:?}");
    }
    // Protect the scheduled one there now: later runs keep it.
    let kept = loop {
        if let [one] = scheduled(&d).as_slice() {
            if d.cli(&["snapshot", "protect", "vol0", one])
                .status
                .success()
            {
                break one.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let before = seen.len();
    wait_for(
        Duration::from_secs(60),
        "3 more scheduled snapshots",
        || {
            seen.extend(scheduled(&d));
            seen.len() >= before + 3
        },
    );
    d.cli_ok(&["schedule", "remove", "vol0"]);
    std::thread::sleep(Duration::from_millis(1500));
    let after = snapshots(&d, "vol0");
    assert!(
        after.contains(&(kept.clone(), true, true)),
        "protected scheduled snapshot {kept} gone: {after:?}"
    );
    for hand in ["auto-20000101T000000Z", "auto-mine"] {
        assert!(
            after.contains(&(hand.to_string(), false, false)),
            "{hand}: {after:?}"
        );
    }

    // The flags are in the pool: after a crash (replayed from the control log) and after
    // a clean stop (read from the checkpoint).
    d.kill9();
    let d2 = Daemon::start_in(&dir.path);
    assert_eq!(snapshots(&d2, "vol0"), after, "after kill -9");
    drop(d2);
    let mut d3 = Daemon::start_in(&dir.path);
    assert_eq!(snapshots(&d3, "vol0"), after, "after a clean stop");
    assert!(d3.stop().success());
}

#[test]
fn a_protected_snapshot_is_deleted_by_nothing_until_unprotected() {
    let d = Daemon::start("ops-protect");
    d.cli_ok(&["snapshot", "create", "vol0", "gold"]);
    assert_eq!(
        d.cli_ok(&["snapshot", "protect", "vol0", "gold"]),
        "protected snapshot 'vol0@gold'\n"
    );
    assert_eq!(snapshots(&d, "vol0"), [("gold".to_string(), false, true)]);
    let out = d.cli(&["--json", "snapshot", "delete", "vol0", "gold"]);
    assert_eq!(code(&out), "protected");
    let out = d.cli(&["--json", "snapshot", "delete", "vol0", "gold", "--force"]);
    assert_eq!(
        code(&out),
        "protected",
        "--force is for connected hosts only"
    );
    let out = d.cli(&["--json", "volume", "delete", "vol0", "--force"]);
    assert_eq!(code(&out), "in_use", "the volume with its snapshot");
    d.cli_ok(&["snapshot", "unprotect", "vol0", "gold"]);
    d.cli_ok(&["snapshot", "delete", "vol0", "gold"]);
    assert!(names(&d, "vol0").is_empty());
    let out = d.cli(&["--json", "snapshot", "protect", "vol0", "gold"]);
    assert_eq!(code(&out), "unknown_snapshot");
}

#[test]
fn deleting_a_volume_or_snapshot_is_refused_while_hosts_are_connected_unless_forced() {
    let d = Daemon::start("ops-delete-in-use");
    d.cli_ok(&["volume", "create", "tmpv", "64M"]);
    d.cli_ok(&["volume", "create", "other", "64M"]);
    let mut host = RawNbd::connect(&d.nbd_addr(), "tmpv");
    host.write(0, &[7u8; 4096]).unwrap();
    let _bystander = RawNbd::connect(&d.nbd_addr(), "other");

    let out = d.cli(&["--json", "volume", "delete", "tmpv"]);
    assert_eq!(code(&out), "in_use");
    let message = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(message.contains("--force"), "{message}");
    // The refusal changed nothing: the host still writes.
    host.write(4096, &[8u8; 4096]).unwrap();

    // Forced: deleted, and the host is disconnected rather than left with EIO.
    d.cli_ok(&["volume", "delete", "tmpv", "--force"]);
    host.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(raw_nbd::closed_by_peer(&mut host.stream));
    assert!(d.cli_json(&["volume", "info", "other"])["name"] == "other");

    // A snapshot with a reader.
    d.cli_ok(&["snapshot", "create", "other", "s2"]);
    d.cli_ok(&["export", "add", "other@s2"]);
    let mut reader = RawNbd::connect(&d.nbd_addr(), "other@s2");
    reader.read(0, 4096).unwrap();
    let out = d.cli(&["--json", "snapshot", "delete", "other", "s2"]);
    assert_eq!(code(&out), "in_use");
    reader.read(0, 4096).unwrap();
    d.cli_ok(&["snapshot", "delete", "other", "s2", "--force"]);
    reader
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(raw_nbd::closed_by_peer(&mut reader.stream));
}

#[test]
fn export_remove_disconnects_the_hosts_of_that_export_only() {
    let d = Daemon::start("ops-export-remove");
    d.cli_ok(&["snapshot", "create", "vol0", "gold"]);
    d.cli_ok(&["snapshot", "create", "vol0", "silver"]);
    d.cli_ok(&["export", "add", "vol0@gold"]);
    d.cli_ok(&["export", "add", "vol0@silver"]);
    let mut gold = RawNbd::connect(&d.nbd_addr(), "vol0@gold");
    let mut silver = RawNbd::connect(&d.nbd_addr(), "vol0@silver");
    gold.read(0, 4096).unwrap();
    assert_eq!(connections(&d, "vol0@gold"), 1);
    assert_eq!(
        d.cli_ok(&["export", "remove", "vol0@gold"]),
        "stopped exporting 'vol0@gold'\n"
    );
    gold.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        raw_nbd::closed_by_peer(&mut gold.stream),
        "the reader of a removed export kept its connection"
    );
    silver.read(0, 4096).unwrap();
    assert_eq!(connections(&d, "vol0@silver"), 1);
}

#[test]
fn in_use_checks_count_iscsi_sessions_against_their_own_volume_only() {
    let d = Daemon::start_iscsi("ops-iscsi-use", &[]);
    d.cli_ok(&["volume", "create", "other", "64M"]);
    d.cli_ok(&["snapshot", "create", "vol0", "base"]);
    let mut on_other = RawIscsi::login(&d.iscsi_addr(), "other");
    assert_eq!(
        d.cli_ok(&["volume", "rollback", "vol0", "base"]),
        "rolled back volume 'vol0' to snapshot 'base'\n",
        "a session on another volume's target blocked the rollback"
    );
    let _on_vol0 = RawIscsi::login(&d.iscsi_addr(), "vol0");
    let out = d.cli(&["--json", "volume", "rollback", "vol0", "base"]);
    assert_eq!(code(&out), "in_use");
    assert_eq!(connections(&d, "vol0"), 1);
    assert_eq!(connections(&d, "other"), 1);
    let out = d.cli(&["--json", "volume", "delete", "other"]);
    assert_eq!(code(&out), "in_use");
    d.cli_ok(&["volume", "delete", "other", "--force"]);
    assert!(raw_iscsi::closed_by_peer(&mut on_other.stream));
}

#[test]
fn session_list_shows_who_is_connected_and_session_close_disconnects_one() {
    let d = Daemon::start_iscsi("ops-sessions", &[]);
    assert!(sessions(&d).is_empty());
    let mut nbd = RawNbd::connect(&d.nbd_addr(), "vol0");
    nbd.write(0, &[1u8; 8192]).unwrap();
    nbd.read(0, 4096).unwrap();
    let mut iscsi = RawIscsi::login(&d.iscsi_addr(), "vol0");
    assert!(iscsi.read16(0, 0, 2, 4096).data.len() == 8192);
    let list = sessions(&d);
    assert_eq!(list.len(), 2, "{list:?}");
    let n = list.iter().find(|s| s["protocol"] == "nbd").unwrap();
    assert_eq!(n["export"], "vol0");
    assert_eq!(n["peer"], nbd.stream.local_addr().unwrap().to_string());
    assert_eq!(n["written_bytes"], 8192);
    assert_eq!(n["read_bytes"], 4096);
    assert_eq!(n["in_flight"], 0);
    let i = list.iter().find(|s| s["protocol"] == "iscsi").unwrap();
    assert_eq!(i["initiator"], raw_iscsi::INITIATOR);
    assert_eq!(i["target"], "iqn.2026-11.dev.tessel:vol0");
    assert_eq!(i["read_bytes"], 8192);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - i["since_unix"].as_u64().unwrap() < 120);
    assert_eq!(connections(&d, "vol0"), 2);

    let table = d.cli_ok(&["session", "list"]);
    assert!(table.lines().next().unwrap().starts_with("ID"), "{table}");
    assert!(table.contains("iqn.2026-11.dev.tessel:vol0"), "{table}");

    let id = n["id"].as_u64().unwrap().to_string();
    assert_eq!(
        d.cli_ok(&["session", "close", &id]),
        format!("closed session {id}\n")
    );
    nbd.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(raw_nbd::closed_by_peer(&mut nbd.stream));
    wait_for(Duration::from_secs(10), "the closed session to go", || {
        sessions(&d).len() == 1
    });
    assert_eq!(connections(&d, "vol0"), 1);
    let out = d.cli(&["--json", "session", "close", &id]);
    assert_eq!(code(&out), "unknown_session");
    assert!(iscsi.read16(0, 0, 1, 4096).data.len() == 4096);
}

/// `schedule list`: volume → (every_secs, keep, next_unix).
fn schedule_table(d: &Daemon) -> std::collections::BTreeMap<String, (u64, u64, u64)> {
    d.cli_json(&["schedule", "list"])["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["volume"].as_str().unwrap().to_string(),
                (
                    s["every_secs"].as_u64().unwrap(),
                    s["keep"].as_u64().unwrap(),
                    s["next_unix"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

#[test]
fn schedules_set_or_removed_at_run_time_survive_restarts_with_their_timers() {
    let dir = TestDir::new("ops-schedule-persist");
    let config = dir.join("tessel.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[[volume]]\nname = \"db\"\npool = \"default\"\nsize = \"64M\"\n\n\
             [[schedule]]\nvolume = \"vol0\"\nevery = \"1h\"\nkeep = 2\n\n\
             [[schedule]]\nvolume = \"db\"\nevery = \"1h\"\nkeep = 2\n",
            include_str!("../config/tessel.toml")
        ),
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let data = dir.join("data");
    let mut d = Daemon::try_start(&data, &args).unwrap();
    // A configured schedule that never ran takes its first snapshot at once; the next is
    // due an hour after that snapshot.
    let first = |d: &Daemon, volume: &str| -> u64 {
        let mut created = 0;
        wait_for(
            Duration::from_secs(30),
            "the first scheduled snapshot",
            || {
                let list = d.cli_json(&["snapshot", "list", volume]);
                created = list["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| s["scheduled"] == true)
                    .map(|s| s["created_unix"].as_u64().unwrap())
                    .max()
                    .unwrap_or(0);
                created > 0
            },
        );
        created
    };
    let taken = first(&d, "vol0");
    first(&d, "db");
    wait_for(
        Duration::from_secs(10),
        "the next one due an hour later",
        || schedule_table(&d)["vol0"] == (3600, 2, taken + 3600),
    );
    // Changes at run time: a new schedule, one removed, one changed.
    d.cli_ok(&["volume", "create", "logs", "64M"]);
    d.cli_ok(&["schedule", "set", "logs", "--every", "2h", "--keep", "5"]);
    d.cli_ok(&["schedule", "remove", "db"]);
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let set_from = unix();
    d.cli_ok(&["schedule", "set", "vol0", "--every", "30m", "--keep", "4"]);
    let set_by = unix();
    let before = schedule_table(&d);
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(before["logs"].0, 7200);
    // Changed after its last snapshot: due one new interval after the change.
    let next = before["vol0"].2;
    assert!(
        (set_from + 1800..=set_by + 1800).contains(&next),
        "{before:?}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    assert!(d.stop().success());

    // Restarted (a second later): the same schedules, due at the same times.
    let mut d = Daemon::try_start(&data, &args).unwrap();
    assert_eq!(schedule_table(&d), before, "after a restart");
    assert_eq!(
        snapshots(&d, "db").len(),
        1,
        "the removed configured schedule came back"
    );
    d.kill9();
    let d = Daemon::try_start(&data, &args).unwrap();
    assert_eq!(schedule_table(&d), before, "after kill -9");
    // A deleted volume's schedule is gone for good.
    d.cli_ok(&["volume", "delete", "logs"]);
    drop(d);
    let d = Daemon::try_start(&data, &args).unwrap();
    assert!(!schedule_table(&d).contains_key("logs"));
    let out = d.cli(&["--json", "schedule", "remove", "logs"]);
    assert_eq!(code(&out), "unknown_schedule");
}

#[test]
fn logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let mut d = Daemon::start("ops-no-colour");
    d.cli_ok(&["volume", "create", "x", "64M"]);
    assert!(d.stop().success());
    let log = d.stderr();
    assert!(log.contains("tessel is ready"), "{log}");
    assert!(!log.contains('\u{1b}'), "escape codes in the log: {log:?}");
}

#[test]
fn sizes_take_decimals_that_come_to_whole_bytes() {
    let d = Daemon::start("ops-decimal-sizes");
    d.cli_ok(&["volume", "create", "half", "1.5G"]);
    assert_eq!(d.cli_json(&["volume", "info", "half"])["size"], 3u64 << 29);
    let out = d.cli(&["volume", "create", "odd", "1.3K"]);
    assert_eq!(out.status.code(), Some(2), "refused by the parser");
    assert!(String::from_utf8_lossy(&out.stderr).contains("whole number of bytes"));
}
