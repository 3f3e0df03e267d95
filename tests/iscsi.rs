//! The iSCSI target through libiscsi's tools (iscsi-ls, iscsi-inq, iscsi-readcapacity16,
//! iscsi-test-cu) and hand-made traffic (tests/common/raw_iscsi.rs) against a running
//! `tessel serve`: discovery, inquiry, the SCSI and iSCSI conformance families, CHAP, the
//! read-only snapshot LUN, malformed PDUs and clients that vanish mid-transfer.
//!
//! The full SCSI and iSCSI families run here (about 25 s and 6 s on a 2-core machine);
//! tools/iscsi-compare runs them against tgt as well.

#[macro_use]
mod common;

use common::raw_iscsi::{
    self, cdb16, RawIscsi, BHS_LEN, OP_DATA_IN, OP_LOGOUT_RESP, OP_REJECT, OP_SCSI_RESP,
};
use common::{pseudo_random, run, run_timeout, say, Daemon};
use std::io::Write;
use std::process::{Command, Output};
use std::time::Duration;

const BS: u32 = 4096;
/// iscsi-test-cu's SCSI family takes about 25 s alone; leave room for a loaded machine.
const CONFORMANCE_TIMEOUT: Duration = Duration::from_secs(300);

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Run a libiscsi tool; its output (stdout and stderr) when it succeeded, Err otherwise.
fn tool(args: &[&str]) -> Result<String, String> {
    let out = run(Command::new(args[0]).args(&args[1..]));
    if out.status.success() {
        Ok(text(&out))
    } else {
        Err(text(&out))
    }
}

/// What iscsi-test-cu reported, test by test.
#[derive(Debug, Default)]
struct CuCounts {
    passed: usize,
    skipped: usize,
    failed: Vec<String>,
}

/// Classify each `Test: NAME ...` of iscsi-test-cu's verbose output by its verdict: CUnit
/// prints `passed` or `FAILED` (unbracketed) when the test ends; a test that printed
/// `[SKIPPED]` before its verdict passed only by skipping. Bracketed `[FAILED]` lines are
/// libiscsi logging an expected failure, and messages after the verdict belong to the
/// suite's teardown.
fn parse_cu(output: &str) -> CuCounts {
    let mut c = CuCounts::default();
    let mut parts = output.split("\n  Test: ");
    parts.next();
    for part in parts {
        let name = part.split(" ...").next().unwrap_or("?").to_string();
        let verdict = find_word(part, "passed")
            .map(|i| (i, true))
            .into_iter()
            .chain(find_word(part, "FAILED").map(|i| (i, false)))
            .min();
        match verdict {
            Some((_, false)) | None => c.failed.push(name),
            Some((at, true)) if part[..at].contains("[SKIPPED]") => c.skipped += 1,
            Some(_) => c.passed += 1,
        }
    }
    c
}

/// First occurrence of `word` not inside brackets or another word.
fn find_word(s: &str, word: &str) -> Option<usize> {
    let b = s.as_bytes();
    s.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = i.checked_sub(1).map(|j| b[j]);
        let after = b.get(i + word.len()).copied();
        let edge = |c: Option<u8>| match c {
            None => true,
            Some(c) => !c.is_ascii_alphanumeric() && c != b'[' && c != b']',
        };
        edge(before) && edge(after)
    })
}

/// Run `iscsi-test-cu --dataloss` on `test` against `url`; fail on any FAILED test.
fn conformance(url: &str, test: &str) -> CuCounts {
    conformance_log(url, test, &[]).0
}

/// `conformance` with more flags (`-V` logs each SCSI command and its status); also the
/// whole output.
fn conformance_log(url: &str, test: &str, flags: &[&str]) -> (CuCounts, String) {
    let out = run_timeout(
        Command::new("iscsi-test-cu")
            .args(["-d", "-v", &format!("--test={test}")])
            .args(flags)
            .arg(url),
        CONFORMANCE_TIMEOUT,
    );
    let all = text(&out);
    let counts = parse_cu(&all);
    say(&format!(
        "iscsi-test-cu {test}: {} really passed, {} skipped, {} failed",
        counts.passed,
        counts.skipped,
        counts.failed.len()
    ));
    assert!(
        counts.failed.is_empty() && out.status.success(),
        "iscsi-test-cu {test}: failed {:?} (exit {}):\n{all}",
        counts.failed,
        out.status
    );
    (counts, all)
}

#[test]
fn cu_output_parser_tells_passed_skipped_and_failed_apart() {
    let out = "Suite: X\n  Test: A ...passed\n  Test: B ...    [SKIPPED] no.\npassed    \
               [SKIPPED] PERSISTENT RESERVE IN is not implemented.\n\n\
               Suite: Y\n  Test: C ...    [FAILED] WRITE10 failed as it should\npassed\n  \
               Test: D ...FAILED\n    1. test.c:12 - oops\n";
    let c = parse_cu(out);
    assert_eq!((c.passed, c.skipped), (2, 1), "{c:?}");
    assert_eq!(c.failed, vec!["D".to_string()]);
}

#[test]
fn discovery_inquiry_and_read_capacity() {
    require!("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16");
    let d = Daemon::start_iscsi("iscsi-discovery", &[]);
    let ls = tool(&["iscsi-ls", "-s", &format!("iscsi://{}/", d.iscsi_addr())]).unwrap();
    assert!(
        ls.contains(&format!(
            "Target:iqn.2026-11.dev.tessel:vol0 Portal:{},1",
            d.iscsi_addr()
        )),
        "{ls}"
    );
    assert!(ls.contains("Lun:0    Type:DIRECT_ACCESS"), "{ls}");
    let url = d.iscsi_url("vol0", 0);
    let inq = tool(&["iscsi-inq", &url]).unwrap();
    assert!(
        inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    // VPD: the supported pages list, and the block limits page.
    let pages = tool(&["iscsi-inq", "-e", "1", "-c", "0", &url]).unwrap();
    for page in ["0x80", "0x83", "0xb0"] {
        assert!(
            pages.to_lowercase().contains(page),
            "no VPD {page}:\n{pages}"
        );
    }
    let cap = tool(&["iscsi-readcapacity16", &url]).unwrap();
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:4096"), "{cap}");
    assert!(cap.contains("Total size:4294967296"), "{cap}");
    assert!(cap.contains("LBPME:1"), "thin volume without LBPME:\n{cap}");
}

#[test]
fn conformance_scsi_family_has_no_failures() {
    require!("iscsi-test-cu");
    let d = Daemon::start_iscsi("iscsi-cu-scsi", &[]);
    let c = conformance(&d.iscsi_url("vol0", 0), "SCSI");
    // 163 really pass with libiscsi 1.19 (tgt 1.0.85: 146); the rest skip features tessel
    // does not claim (EXTENDED COPY, ORWRITE, SANITIZE, removable media, multipath, ...).
    // One fewer is a regression: raise this when more pass.
    assert!(
        c.passed >= 163,
        "only {} SCSI tests really passed (163 did on 2026-12-03)",
        c.passed
    );
}

#[test]
fn conformance_iscsi_family_has_no_failures() {
    require!("iscsi-test-cu");
    let d = Daemon::start_iscsi("iscsi-cu-iscsi", &[]);
    let c = conformance(&d.iscsi_url("vol0", 0), "iSCSI");
    // All 15 of libiscsi 1.19's iSCSI family pass.
    assert!(
        c.passed >= 15,
        "only {} iSCSI tests really passed (15 did on 2026-12-03)",
        c.passed
    );
}

const CHAP_CONFIG: &str = r#"
[[pool]]
name = "default"
devices = ["pool0.img"]
create_size = "2G"

[[volume]]
name = "vol0"
pool = "default"
size = "1G"

[[volume]]
name = "open"
pool = "default"
size = "1G"

[iscsi]
unmatched = "allow"

[[iscsi.target]]
volume = "vol0"
allowed_initiators = ["iqn.2026-11.dev.tessel:allowed"]
chap_user = "alice"
chap_secret = "alice-secret-12"
"#;

#[test]
fn chap_right_secret_logs_in_wrong_secret_and_unknown_initiator_are_refused() {
    require!("iscsi-inq", "iscsi-ls");
    let dir = common::TestDir::new("iscsi-chap");
    let conf = dir.join("tessel.toml");
    std::fs::write(&conf, CHAP_CONFIG).unwrap();
    let d = Daemon::start_iscsi_in(&dir.join("data"), &["--config", conf.to_str().unwrap()]);
    let addr = d.iscsi_addr();
    let url =
        |cred: &str, vol: &str| format!("iscsi://{cred}{addr}/iqn.2026-11.dev.tessel:{vol}/0");
    let inq = |initiator: &str, cred: &str, vol: &str| {
        tool(&["iscsi-inq", "-i", initiator, &url(cred, vol)])
    };
    let allowed = "iqn.2026-11.dev.tessel:allowed";
    let stranger = "iqn.2026-11.dev.tessel:stranger";

    let ok = inq(allowed, "alice%alice-secret-12@", "vol0");
    assert!(
        ok.as_ref().is_ok_and(|o| o.contains("DIRECT_ACCESS")),
        "right secret refused: {ok:?}"
    );
    for (who, cred, why) in [
        (allowed, "alice%alice-secret-13@", "wrong secret"),
        (allowed, "mallory%alice-secret-12@", "wrong user"),
        (allowed, "", "no credentials"),
        (stranger, "alice%alice-secret-12@", "initiator not allowed"),
    ] {
        let r = inq(who, cred, "vol0");
        assert!(r.is_err(), "{why}: logged in anyway: {r:?}");
    }
    // With `unmatched = "allow"`, a volume no rule covers is open; discovery needs no
    // credentials.
    inq(stranger, "", "open").expect("open volume refused");
    let ls = tool(&["iscsi-ls", &format!("iscsi://{addr}/")]).unwrap();
    assert!(ls.contains("iqn.2026-11.dev.tessel:open"), "{ls}");
    let mut d = d;
    assert!(d.healthy(), "daemon unhealthy after refused logins");
}

/// One CHAP-protected volume and the documented default for the others (deny, as the file
/// has a rule); `extra` adds rules.
fn access_config(extra: &str) -> String {
    format!(
        r#"
[[pool]]
name = "default"
devices = ["pool0.img"]
create_size = "2G"

[[volume]]
name = "vol0"
pool = "default"
size = "256M"

[[iscsi.target]]
volume = "vol0"
chap_user = "alice"
chap_secret = "alice-secret-12"
{extra}"#
    )
}

/// A daemon with iSCSI on `dir/data`, configured by `config` (kept in `dir`).
fn start_with_config(dir: &common::TestDir, config: &str) -> Daemon {
    let conf = dir.join("tessel.toml");
    std::fs::write(&conf, config).unwrap();
    Daemon::start_iscsi_in(&dir.join("data"), &["--config", conf.to_str().unwrap()])
}

const ALICE: &str = "alice%alice-secret-12@";
const INITIATOR: &str = "iqn.2026-11.dev.tessel:host";

/// iscsi-inq against `volume` as `initiator`, with `cred` (`user%secret@` or "").
fn inquiry(d: &Daemon, initiator: &str, cred: &str, volume: &str) -> Result<String, String> {
    let url = format!(
        "iscsi://{cred}{}/iqn.2026-11.dev.tessel:{volume}/0",
        d.iscsi_addr()
    );
    tool(&["iscsi-inq", "-i", initiator, &url])
}

/// The targets SendTargets lists to `initiator`.
fn discovered(d: &Daemon, initiator: &str) -> String {
    let url = format!("iscsi://{}/", d.iscsi_addr());
    tool(&["iscsi-ls", "-i", initiator, &url]).expect("discovery")
}

/// A clone's login: refused without CHAP, accepted with its origin's secret.
fn assert_needs_alice(d: &Daemon, volume: &str, when: &str) {
    let r = inquiry(d, INITIATOR, "", volume);
    assert!(r.is_err(), "{when}: {volume} logged in without CHAP: {r:?}");
    let r = inquiry(d, INITIATOR, ALICE, volume);
    assert!(
        r.as_ref().is_ok_and(|o| o.contains("DIRECT_ACCESS")),
        "{when}: {volume} refused its origin's secret: {r:?}"
    );
}

#[test]
fn a_clone_of_a_chap_protected_volume_refuses_logins_without_chap() {
    require!("iscsi-inq");
    let dir = common::TestDir::new("iscsi-clone-access");
    let config = access_config("");
    let mut d = start_with_config(&dir, &config);
    assert_needs_alice(&d, "vol0", "the origin");
    d.cli_ok(&["snapshot", "create", "vol0", "base"]);
    d.cli_ok(&["clone", "create", "vol0@base", "copy"]);
    assert_needs_alice(&d, "copy", "at once");
    // A clone of the clone holds the same data.
    d.cli_ok(&["snapshot", "create", "copy", "s"]);
    d.cli_ok(&["clone", "create", "copy@s", "copy2"]);
    assert_needs_alice(&d, "copy2", "clone of a clone");
    // Inflated, the clone no longer depends on vol0 in the engine, but holds its data.
    d.cli_ok(&["clone", "inflate", "copy", "--wait"]);
    d.cli_ok(&["snapshot", "delete", "vol0", "base"]);
    assert_needs_alice(&d, "copy", "inflated");
    d.stop();
    let d = start_with_config(&dir, &config);
    assert_needs_alice(&d, "copy", "after a restart");
    assert_needs_alice(&d, "copy2", "after a restart");
}

#[test]
fn a_cli_created_volume_matching_a_pattern_requires_chap() {
    require!("iscsi-inq", "iscsi-ls");
    let dir = common::TestDir::new("iscsi-pattern-access");
    let rule = r#"
[[iscsi.target]]
volume = "db-*"
allowed_initiators = ["iqn.2026-11.dev.tessel:db-host"]
chap_user = "bob"
chap_secret = "bob-secret-1234"
"#;
    let d = start_with_config(&dir, &access_config(rule));
    d.cli_ok(&["volume", "create", "db-7", "64M"]);
    let (host, bob) = ("iqn.2026-11.dev.tessel:db-host", "bob%bob-secret-1234@");
    let r = inquiry(&d, host, "", "db-7");
    assert!(r.is_err(), "db-7 logged in without CHAP: {r:?}");
    let r = inquiry(&d, host, bob, "db-7");
    assert!(r.is_ok(), "db-7 refused the pattern's secret: {r:?}");
    let r = inquiry(&d, INITIATOR, bob, "db-7");
    assert!(r.is_err(), "an initiator outside the list logged in: {r:?}");
    // Discovery lists db-7 only to the initiator its rule allows.
    assert!(discovered(&d, host).contains("tessel:db-7"));
    let others = discovered(&d, INITIATOR);
    assert!(
        !others.contains("tessel:db-7") && others.contains("tessel:vol0"),
        "{others}"
    );
}

#[test]
fn volumes_no_rule_covers_are_refused_and_not_discovered_once_rules_exist() {
    require!("iscsi-inq", "iscsi-ls");
    let dir = common::TestDir::new("iscsi-unmatched");
    let d = start_with_config(&dir, &access_config(""));
    d.cli_ok(&["volume", "create", "other", "64M"]);
    for cred in ["", ALICE] {
        let r = inquiry(&d, INITIATOR, cred, "other");
        assert!(
            r.is_err(),
            "a volume no rule covers logged in ({cred}): {r:?}"
        );
    }
    let listed = discovered(&d, INITIATOR);
    assert!(
        listed.contains("tessel:vol0") && !listed.contains("tessel:other"),
        "{listed}"
    );
    // Without any rule (the embedded default on 127.0.0.1) every volume is open.
    let open = Daemon::start_iscsi("iscsi-unmatched-open", &[]);
    open.cli_ok(&["volume", "create", "other", "64M"]);
    let r = inquiry(&open, INITIATOR, "", "other");
    assert!(r.is_ok(), "the embedded default refused a volume: {r:?}");
    assert!(discovered(&open, INITIATOR).contains("tessel:other"));
}

#[test]
fn snapshot_lun_reads_the_snapshot_and_refuses_writes_with_write_protected() {
    require!("iscsi-ls", "iscsi-test-cu");
    let d = Daemon::start_iscsi("iscsi-snap", &[]);
    let addr = d.iscsi_addr();
    let before = pseudo_random(64 << 10, 11);
    let after = pseudo_random(64 << 10, 12);
    let mut s = RawIscsi::login(&addr, "vol0");
    assert_eq!(s.write16(0, 8, &before, BS).status, 0);
    d.cli_ok(&["snapshot", "create", "vol0", "s1"]);
    d.cli_ok(&["export", "add", "vol0@s1"]);
    assert_eq!(s.write16(0, 8, &after, BS).status, 0);
    let ls = tool(&["iscsi-ls", "-s", &format!("iscsi://{addr}/")]).unwrap();
    assert!(ls.contains("Lun:1"), "snapshot LUN not listed:\n{ls}");

    // The session that was logged in before the export finds LUN 1 too.
    let r = s.read16(1, 8, 16, BS);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        r.data == before,
        "snapshot LUN does not hold the snapshot's data"
    );
    let r = s.read16(0, 8, 16, BS);
    assert!(
        r.data == after,
        "LUN 0 lost a write made after the snapshot"
    );
    let w = s.write16(1, 8, &after[..4096], BS);
    assert_eq!(w.status, 2, "write to the snapshot LUN not refused: {w:?}");
    assert_eq!(
        w.sense_key().map(|(k, asc, _)| (k, asc)),
        Some((0x7, 0x27)),
        "not DATA PROTECT / WRITE PROTECTED: {w:?}"
    );
    let r = s.read16(1, 8, 16, BS);
    assert!(r.data == before, "the refused write changed the snapshot");

    // libiscsi's own read-only checks: it runs only on a LUN whose MODE SENSE says write
    // protected, and sends every write command. Its one part tessel lacks, ORWRITE (not
    // implemented on any LUN), makes it count as skipped: check each other command ran and
    // was refused with DATA PROTECT / WRITE PROTECTED, and that ORWRITE is all it skipped.
    let (_, log) = conformance_log(&d.iscsi_url("vol0", 1), "SCSI.ReadOnly", &["-V"]);
    for cmd in [
        "COMPAREANDWRITE",
        "UNMAP",
        "WRITE10",
        "WRITE12",
        "WRITE16",
        "WRITESAME10",
        "WRITESAME16",
        "WRITEVERIFY10",
        "WRITEVERIFY12",
        "WRITEVERIFY16",
    ] {
        assert!(
            log.contains(&format!(
                "[OK] {cmd} returned CHECK_CONDITION DATA PROTECTION(0x07) WRITE_PROTECTED(0x2700)"
            )),
            "SCSI.ReadOnly did not see {cmd} refused as write protected:\n{log}"
        );
    }
    let refused = log.matches("WRITE_PROTECTED(0x2700)").count();
    assert!(refused >= 13, "{refused} write commands refused:\n{log}");
    let skips: Vec<&str> = log.lines().filter(|l| l.contains("[SKIPPED]")).collect();
    assert!(
        skips
            .iter()
            .all(|l| l.contains("ORWRITE is not implemented")),
        "SCSI.ReadOnly skipped more than ORWRITE: {skips:?}"
    );
    assert!(
        log.contains("asserts     14     14     14      0"),
        "SCSI.ReadOnly ran fewer checks than its 14:\n{log}"
    );
}

/// Send `bytes` on a fresh connection and expect the target to close it.
fn expect_closed(addr: &str, what: &str, bytes: &[u8]) {
    let mut c = RawIscsi::bare(addr);
    // The target may close before all of `bytes` is written: a write error is fine here.
    let _ = c.send_raw(bytes);
    assert!(
        raw_iscsi::closed_by_peer(&mut c.stream),
        "{what}: connection left open"
    );
}

fn login_header(data_len: u32) -> [u8; BHS_LEN] {
    let mut b = [0u8; BHS_LEN];
    b[0] = 0x43;
    b[1] = 0x87;
    b[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
    b
}

#[test]
fn malformed_pdus_never_touch_other_sessions() {
    let mut d = Daemon::start_iscsi("iscsi-malformed", &[]);
    let addr = d.iscsi_addr();
    let mut good = RawIscsi::login(&addr, "vol0");
    let pattern = pseudo_random(128 << 10, 21);
    assert_eq!(good.write16(0, 100, &pattern, BS).status, 0);

    // Before login: an unknown opcode, a data segment longer than anything negotiable,
    // a full feature PDU, garbage.
    let mut unknown = [0u8; BHS_LEN];
    unknown[0] = 0x1e;
    expect_closed(&addr, "unknown opcode before login", &unknown);
    expect_closed(&addr, "16 MiB login data segment", &login_header(0xff_ffff));
    let mut early = [0u8; BHS_LEN];
    early[0] = 0x01;
    early[32] = 0x00; // TEST UNIT READY
    expect_closed(&addr, "SCSI command before login", &early);
    expect_closed(&addr, "garbage", &pseudo_random(4096, 22));
    // A login whose data segment never comes: the target waits, the client leaves.
    {
        let mut c = RawIscsi::bare(&addr);
        c.send_raw(&login_header(1000)).unwrap();
        c.send_raw(b"InitiatorName=iqn.x").unwrap();
    }
    // Half a header, then gone.
    {
        let mut c = RawIscsi::bare(&addr);
        c.send_raw(&login_header(0)[..20]).unwrap();
    }

    // After a real login.
    let mut s = RawIscsi::login(&addr, "vol0");
    // An unknown opcode is rejected; the session goes on.
    let mut bad = [0u8; BHS_LEN];
    bad[0] = 0x1d;
    bad[16..20].copy_from_slice(&77u32.to_be_bytes());
    s.send_pdu(bad, &[]);
    let r = s.recv().expect("a Reject");
    assert_eq!(r.opcode(), OP_REJECT, "{r:?}");
    // A command far outside the CmdSN window is ignored (no answer, no execution): the
    // next command gets its own answer and nothing else.
    let mut far = s.command_header(0, &cdb16(0x8a, 100, 1), 0, BS);
    s.cmd_sn = s.cmd_sn.wrapping_sub(1);
    far[24..28].copy_from_slice(&s.cmd_sn.wrapping_add(100_000).to_be_bytes());
    s.send_pdu(far, &[0xee; 4096]);
    let r = s.read16(0, 100, 32, BS);
    assert_eq!(r.status, 0);
    assert!(r.data == pattern, "an out-of-window WRITE was executed");
    // A SCSI command whose data segment exceeds what the target accepts ends this
    // connection only.
    let big = s.command_header(0, &cdb16(0x8a, 0, 256), 0, 256 * BS);
    // The target may close while the segment is still being written: EPIPE is fine here.
    let _ = s.try_send_pdu(big, &vec![0xab; 1 << 20]);
    assert!(
        raw_iscsi::closed_by_peer(&mut s.stream),
        "oversized segment accepted"
    );

    // Truncated data segment: the header claims 64 KiB of immediate data, 1000 bytes come.
    {
        let mut s = RawIscsi::login(&addr, "vol0");
        let mut h = s.command_header(0, &cdb16(0x8a, 100, 16), 0, 16 * BS);
        h[5..8].copy_from_slice(&(65536u32).to_be_bytes()[1..]);
        s.send_raw(&h).unwrap();
        s.send_raw(&[0xcd; 1000]).unwrap();
    }
    // Mid-transfer: a 4 MiB READ whose Data-In nobody reads, a WRITE abandoned after its
    // first R2T burst started.
    {
        let mut s = RawIscsi::login(&addr, "vol0");
        let h = s.command_header(0, &cdb16(0x88, 0, 1024), 1024 * BS, 0);
        s.send_pdu(h, &[]);
        let h = s.command_header(0, &cdb16(0x88, 0, 1024), 1024 * BS, 0);
        s.send_pdu(h, &[]);
    }
    {
        let mut s = RawIscsi::login(&addr, "vol0");
        let h = s.command_header(0, &cdb16(0x8a, 100, 256), 0, 256 * BS);
        s.send_pdu(h, &[0x99; 65536]);
        let r2t = s.recv().expect("an R2T");
        assert_eq!(r2t.opcode(), 0x31, "{r2t:?}");
        let mut d = [0u8; BHS_LEN];
        d[0] = 0x05;
        d[16..20].copy_from_slice(&h[16..20]);
        d[20..24].copy_from_slice(&r2t.bhs[20..24]);
        d[40..44].copy_from_slice(&r2t.bhs[40..44]);
        d[5..8].copy_from_slice(&(65536u32).to_be_bytes()[1..]);
        s.send_raw(&d).unwrap();
        s.send_raw(&[0x99; 30000]).unwrap();
        s.stream.flush().unwrap();
    }

    // The first session never noticed: its data is intact, it reads and writes.
    std::thread::sleep(Duration::from_millis(200));
    let r = good.read16(0, 100, 32, BS);
    assert_eq!(r.status, 0, "{r:?}");
    assert!(
        r.data == pattern,
        "data changed by another connection's garbage"
    );
    let more = pseudo_random(64 << 10, 23);
    assert_eq!(good.write16(0, 200, &more, BS).status, 0);
    assert!(good.read16(0, 200, 16, BS).data == more);
    // New sessions still log in, and the daemon is alive.
    let mut again = RawIscsi::login(&addr, "vol0");
    assert!(again.read16(0, 100, 32, BS).data == pattern);
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
}

#[test]
fn iscsi_perf_killed_mid_run_leaves_the_daemon_serving() {
    require!("iscsi-perf", "iscsi-inq");
    let mut d = Daemon::start_iscsi("iscsi-perf-kill", &[]);
    let url = d.iscsi_url("vol0", 0);
    let mut good = RawIscsi::login(&d.iscsi_addr(), "vol0");
    let pattern = pseudo_random(64 << 10, 31);
    assert_eq!(good.write16(0, 5000, &pattern, BS).status, 0);
    for _ in 0..3 {
        let mut perf = Command::new("iscsi-perf")
            .args(["-r", "-m", "32", "-b", "64", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run iscsi-perf");
        std::thread::sleep(Duration::from_millis(700));
        let _ = perf.kill(); // SIGKILL: no logout, reads in flight
        let _ = perf.wait();
    }
    assert!(good.read16(0, 5000, 16, BS).data == pattern);
    tool(&["iscsi-inq", &url]).expect("a new session after killed clients");
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
}

#[test]
fn hostile_data_out_is_refused_and_logout_still_closes_the_connection() {
    let mut d = Daemon::start_iscsi("iscsi-hostile-data-out", &[]);
    let mut s = RawIscsi::login_with(&d.iscsi_addr(), "vol0", false);

    // WRITE(10) of one block with EDTL four blocks, then unsolicited Data-Out of two
    // blocks and one more: the data past the block is legal and dropped (it used to panic
    // the reactor).
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&300u32.to_be_bytes());
    cdb[8] = 1;
    let mut h = s.command_header(0, &cdb, 0, 4 * BS);
    h[1] &= !0x80; // not final: unsolicited Data-Out follows
    let itt = u32::from_be_bytes(h[16..20].try_into().unwrap());
    s.send_pdu(h, &[]);
    let block = pseudo_random(BS as usize, 41);
    let mut first = block.clone();
    first.extend_from_slice(&[0xee; BS as usize]);
    s.send_pdu(
        RawIscsi::data_out_header(itt, u32::MAX, 0, 0, false),
        &first,
    );
    s.send_pdu(
        RawIscsi::data_out_header(itt, u32::MAX, 1, 2 * BS, true),
        &[0xee; BS as usize],
    );
    let r = s.recv().expect("a SCSI Response");
    assert_eq!((r.opcode(), r.bhs[3]), (OP_SCSI_RESP, 0), "{r:?}");
    s.exp_stat_sn = r.u32_at(24).wrapping_add(1);
    assert!(s.read16(0, 300, 1, BS).data == block);

    // READ(16) and a Data-Out with its ITT in one send: the Data-Out is rejected, the read
    // is answered, and the logout after it is too.
    let h = s.command_header(0, &cdb16(0x88, 300, 1), BS, 0);
    let itt = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut bytes = h.to_vec();
    let mut dout = RawIscsi::data_out_header(itt, u32::MAX, 0, 0, true);
    dout[5..8].copy_from_slice(&BS.to_be_bytes()[1..]);
    bytes.extend_from_slice(&dout);
    bytes.extend_from_slice(&vec![0xdd; BS as usize]);
    s.send_raw(&bytes).unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let p = s.recv().expect("answers to the read and the Data-Out");
        if p.opcode() == OP_DATA_IN {
            s.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            assert!(p.data == block, "the read returned other data");
        }
        got.push(p.opcode());
    }
    got.sort();
    assert_eq!(got, vec![OP_DATA_IN, OP_REJECT]);
    let r = s.logout().expect("a Logout Response");
    assert_eq!((r.opcode(), r.bhs[2]), (OP_LOGOUT_RESP, 0), "{r:?}");
    assert!(
        raw_iscsi::closed_by_peer(&mut s.stream),
        "connection left open after logout"
    );
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
    assert!(!d.stderr().contains("panicked"), "{}", d.stderr());
}

/// The daemon's resident set size, in bytes.
fn rss(d: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/PID/status");
    kb << 10
}

/// Sense key and ASC of the CHECK CONDITION answering the next PDU.
fn next_check_condition(s: &mut RawIscsi) -> (u8, u8) {
    let r = s.recv().expect("a SCSI Response");
    assert_eq!((r.opcode(), r.bhs[3]), (OP_SCSI_RESP, 2), "{r:?}");
    s.exp_stat_sn = r.u32_at(24).wrapping_add(1);
    (r.data[2 + 2] & 0x0f, r.data[2 + 12])
}

#[test]
fn oversized_writes_are_refused_before_memory_or_r2t() {
    let mut d = Daemon::start_iscsi("iscsi-oversized", &[]);
    let mut s = RawIscsi::login(&d.iscsi_addr(), "vol0");
    let before = rss(&d);
    // WRITE(16) of 8M blocks with EDTL 0xffffffff, twice: each used to allocate and zero
    // up to 4 GiB before the range was checked.
    for _ in 0..2 {
        let h = s.command_header(0, &cdb16(0x8a, 0, 8 << 20), 0, u32::MAX);
        s.send_pdu(h, &[]);
        assert_eq!(
            next_check_condition(&mut s),
            (0x05, 0x21),
            "LBA OUT OF RANGE"
        );
    }
    // In range but 16 MiB, twice the most one command may move.
    let h = s.command_header(0, &cdb16(0x8a, 0, 4096), 0, 16 << 20);
    s.send_pdu(h, &[]);
    assert_eq!(
        next_check_condition(&mut s),
        (0x05, 0x24),
        "INVALID FIELD IN CDB"
    );
    let grew = rss(&d).saturating_sub(before);
    assert!(grew < 64 << 20, "RSS grew by {} MiB", grew >> 20);
    let data = pseudo_random(64 << 10, 51);
    assert_eq!(s.write16(0, 10, &data, BS).status, 0);
    assert!(s.read16(0, 10, 16, BS).data == data);
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
}

#[test]
fn unread_replies_of_pipelined_reads_stay_within_the_session_budget() {
    let mut d = Daemon::start_iscsi("iscsi-unread-replies", &[]);
    let mut s = RawIscsi::login(&d.iscsi_addr(), "vol0");
    let data = pseudo_random(64 << 10, 52);
    assert_eq!(s.write16(0, 0, &data, BS).status, 0);
    let before = rss(&d);
    // 128 READ(16)s of 8 MiB (the whole CmdSN window, 1 GiB) and no reply read.
    let mut bytes = Vec::new();
    for i in 0..128u64 {
        let h = s.command_header(0, &cdb16(0x88, (i % 32) * 2048, 2048), 8 << 20, 0);
        bytes.extend_from_slice(&h);
    }
    let first_itt = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    s.send_raw(&bytes).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let grew = rss(&d).saturating_sub(before);
    say(&format!(
        "128 unread 8 MiB READs: daemon RSS grew {} MiB",
        grew >> 20
    ));
    // The default budget is 16 MiB a session; read buffers plus unread replies hold about
    // twice that, and the kernel's socket buffers are not ours.
    assert!(grew < 128 << 20, "RSS grew by {} MiB", grew >> 20);
    // Once the client reads, every READ is answered (in any order: completions race),
    // the first with the data written; tasks held back resume as replies drain, without
    // waiting for the once-a-second tick (128 of them would take a minute).
    let start = std::time::Instant::now();
    let mut done = 0;
    while done < 128 {
        let p = s.recv().expect("Data-In");
        assert_eq!(p.opcode(), OP_DATA_IN, "not a Data-In: {:?}", p.bhs);
        if p.u32_at(16) == first_itt && p.u32_at(40) == 0 {
            assert!(p.data[..64 << 10] == data[..], "the first READ's data");
        }
        if p.bhs[1] & 0x01 != 0 {
            assert_eq!(p.bhs[3], 0, "READ failed: {:?}", p.bhs);
            s.exp_stat_sn = p.u32_at(24).wrapping_add(1);
            done += 1;
        }
    }
    say(&format!(
        "the 128 READs (1 GiB) drained in {:?}",
        start.elapsed()
    ));
    assert!(start.elapsed() < Duration::from_secs(30));
    let r = s.logout().expect("a Logout Response");
    assert_eq!(r.opcode(), OP_LOGOUT_RESP, "{:?}", r.bhs);
    drop(s);
    let mut other = RawIscsi::login(&d.iscsi_addr(), "vol0");
    assert!(other.read16(0, 0, 16, BS).data == data);
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
}

/// The embedded default's pool and volume, with a small daemon-wide memory budget.
const SMALL_BUDGET_CONFIG: &str = r#"
[[pool]]
name = "default"
devices = ["pool0.img"]
create_size = "2G"

[[volume]]
name = "vol0"
pool = "default"
size = "1G"

[limits]
connection_memory = "16M"
memory = "64M"
"#;

#[test]
fn many_sessions_with_unread_reads_and_pending_writes_stay_within_the_daemons_budget() {
    let dir = common::TestDir::new("iscsi-global-budget");
    let mut d = start_with_config(&dir, SMALL_BUDGET_CONFIG);
    let addr = d.iscsi_addr();
    const SESSIONS: usize = 12;
    const COMMANDS: u64 = 16;
    let mut readers: Vec<RawIscsi> = (0..SESSIONS)
        .map(|_| RawIscsi::login(&addr, "vol0"))
        .collect();
    let mut writers: Vec<RawIscsi> = (0..SESSIONS)
        .map(|_| RawIscsi::login(&addr, "vol0"))
        .collect();
    let before = rss(&d);
    // Each reader: 16 READ(16)s of 8 MiB, replies never read; each writer: 16 WRITE(16)s
    // of 8 MiB whose data never comes (InitialR2T: each admitted one holds its buffer and
    // waits for Data-Out). 3 GiB asked for; one session alone used to hold up to 32 MiB.
    for (r, w) in readers.iter_mut().zip(writers.iter_mut()) {
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        for i in 0..COMMANDS {
            reads.extend_from_slice(&r.command_header(0, &cdb16(0x88, i * 2048, 2048), 8 << 20, 0));
            writes.extend_from_slice(&w.command_header(
                0,
                &cdb16(0x8a, i * 2048, 2048),
                0,
                8 << 20,
            ));
        }
        r.send_raw(&reads).unwrap();
        w.send_raw(&writes).unwrap();
    }
    std::thread::sleep(Duration::from_secs(3));
    let grew = rss(&d).saturating_sub(before);
    say(&format!(
        "{SESSIONS} sessions with unread 8 MiB READs and {SESSIONS} with pending 8 MiB WRITEs, \
         limits.memory 64 MiB: daemon RSS grew {} MiB",
        grew >> 20
    ));
    assert!(grew < 160 << 20, "RSS grew by {} MiB", grew >> 20);
    // The writers leave, and with them their buffers; the readers read (at once, as real
    // initiators would: each holds its share until its replies are read) and every READ
    // is answered.
    drop(writers);
    let drains: Vec<_> = readers
        .into_iter()
        .map(|mut r| {
            std::thread::spawn(move || {
                let mut done = 0;
                while done < COMMANDS {
                    let p = r.recv().expect("Data-In");
                    assert_eq!(p.opcode(), OP_DATA_IN, "not a Data-In: {:?}", p.bhs);
                    if p.bhs[1] & 0x01 != 0 {
                        assert_eq!(p.bhs[3], 0, "READ failed: {:?}", p.bhs);
                        r.exp_stat_sn = p.u32_at(24).wrapping_add(1);
                        done += 1;
                    }
                }
            })
        })
        .collect();
    for t in drains {
        t.join().expect("a reader got all its replies");
    }
    let mut s = RawIscsi::login(&addr, "vol0");
    let data = pseudo_random(64 << 10, 53);
    assert_eq!(s.write16(0, 7, &data, BS).status, 0);
    assert!(s.read16(0, 7, 16, BS).data == data);
    assert!(d.healthy(), "daemon unhealthy:\n{}", d.stderr());
}
