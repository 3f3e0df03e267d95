//! Damaged metadata under the daemon (issue 14): a flipped byte in a journal block that
//! later flushed blocks depend on stops `tessel serve` with an error naming the block, and
//! `tessel pool salvage` reports what it drops and lets the daemon start again.

#[macro_use]
mod common;

use common::{check, qemu_io, run, Daemon, TestDir, TESSEL};
use std::os::unix::fs::FileExt;
use std::process::Command;
use tessel_engine::format::Superblock;

const BLOCK: u64 = 4096;

/// (region, blocks of the current run from block 0 on) of the journal region that holds
/// the longest chain.
fn longest_region(pool: &std::fs::File, sb: &Superblock) -> (u64, u64) {
    let mut b = vec![0u8; BLOCK as usize];
    (0..sb.journal_regions as u64)
        .map(|r| {
            let start = sb.journal_start + r * sb.journal_region_bytes;
            let mut n = 0;
            loop {
                pool.read_exact_at(&mut b, start + n * BLOCK).expect("read");
                let seq = u64::from_le_bytes(b[16..24].try_into().unwrap());
                if &b[..4] != b"TJNL" || seq != n {
                    break (r, n);
                }
                n += 1;
            }
        })
        .max_by_key(|&(_, n)| n)
        .expect("regions")
}

#[test]
fn a_damaged_journal_stops_the_daemon_until_salvage_reports_the_loss() {
    require!("qemu-io");
    let dir = TestDir::new("salvage");
    let mut d = Daemon::start_in(&dir.path);
    let commands: Vec<String> = (0..12)
        .flat_map(|k| [format!("write -P {} {k}M 1M", 0x40 + k), "flush".into()])
        .collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(&d.uri("vol0"), &commands);
    d.kill9();

    let pool = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("pool0.img"))
        .expect("pool file");
    let mut head = vec![0u8; BLOCK as usize];
    pool.read_exact_at(&mut head, 0).expect("superblock");
    let sb = Superblock::decode(&head).expect("superblock");
    let (region, blocks) = longest_region(&pool, &sb);
    assert!(blocks >= 4, "flushed writes fill journal blocks: {blocks}");
    let at = sb.journal_start + region * sb.journal_region_bytes + BLOCK + 300;
    let mut byte = [0u8];
    pool.read_exact_at(&mut byte, at).expect("read");
    pool.write_all_at(&[byte[0] ^ 1], at).expect("flip");
    drop(pool);

    let err = Daemon::try_start(&dir.path, &[])
        .err()
        .expect("the daemon must refuse");
    let want = format!("journal region {region} block 1 (byte offset");
    assert!(err.contains(&want) && err.contains("salvage"), "{err}");

    let out = check(
        Command::new(TESSEL)
            .args(["--json", "pool", "salvage", "--data-dir"])
            .arg(&dir.path),
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    let dropped = report["dropped"].as_array().expect("dropped");
    assert_eq!(dropped.len(), 1, "{report}");
    assert_eq!(dropped[0]["ring"], "journal");
    assert_eq!(dropped[0]["region"], region);
    assert_eq!(dropped[0]["seq"], 1);
    assert_eq!(dropped[0]["last_seq"], blocks - 1, "{report}");
    assert!(dropped[0]["records"].as_u64().unwrap() > 0);
    assert_eq!(report["images"], 1);

    let d = Daemon::start_in(&dir.path);
    // Clusters whose records lie before the damage read back (one 1 MiB write's records
    // may span two commits); the last write's lay after it and are gone, as reported.
    let reads = |k: u64, off: u64, len: &str| {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-r", "-c"])
            .arg(format!("read -P {} {off} {len}", 0x40 + k))
            .arg(d.uri("vol0")))
        .status
        .success()
    };
    let intact = (0..16).filter(|&c| reads(0, c << 16, "64k")).count();
    assert!(
        intact > 0,
        "no cluster of the first write survived; {report}"
    );
    assert!(
        !reads(11, 11 << 20, "1M"),
        "the last write was reported dropped"
    );
}
