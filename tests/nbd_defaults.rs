//! NBD clients that negotiate no block size get the protocol's defaults (any byte range,
//! requests past 32 MiB), through libnbd with its client-side checks off; operators who
//! prefer can refuse them (`[nbd] require_block_size`). docs/nbd.md, issue 20.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// tests/scripts/nbd_unaligned.py: random unaligned requests against a model.
const UNALIGNED: &str = include_str!("scripts/nbd_unaligned.py");
/// tests/scripts/nbd_txlog.py: the transaction-log integrity check.
const TXLOG: &str = include_str!("scripts/nbd_txlog.py");

/// The shipped config with `edits` (whole lines, old to new) applied, written into `dir`.
fn config(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let mut text = include_str!("../config/tessel.toml").to_string();
    for (old, new) in edits {
        assert!(text.contains(old), "config/tessel.toml has no {old:?}");
        text = text.replace(old, new);
    }
    let path = dir.join("tessel.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// nbdsh, or None after a skip (the caller returns).
fn nbdsh() -> Option<Command> {
    if let Some(missing) = common::missing(&["nbdsh"]) {
        common::skip(module_path!(), &format!("{missing} not installed"));
        return None;
    }
    let c = common::nbdsh();
    if c.is_none() {
        common::skip(
            module_path!(),
            "nbdsh cannot import the libnbd python module (python3-libnbd)",
        );
    }
    c
}

/// Run `script` under nbdsh with `env`; it must print "ok" last.
fn script(script: &str, env: &[(&str, &str)]) -> String {
    let mut c = nbdsh().expect("checked by the caller");
    c.envs(env.iter().copied()).args(["-c", script]);
    let out = check(&mut c);
    assert!(out.trim_end().ends_with("ok"), "{out}");
    out
}

/// Start a daemon on `data` with `config`, and create volume `u` of `block` bytes.
fn daemon(data: &Path, config: &Path) -> Daemon {
    Daemon::try_start(data, &["--config", config.to_str().unwrap()]).unwrap()
}

fn unaligned_requests_match_a_model_across_a_crash(block: u32, cluster: &str) {
    if nbdsh().is_none() {
        return;
    }
    let dir = TestDir::new(&format!("nbd-unaligned-{block}"));
    let cfg = config(
        &dir.path,
        &[(
            "cluster_size = \"64K\"",
            &format!("cluster_size = \"{cluster}\""),
        )],
    );
    let data = dir.join("data");
    let mut d = daemon(&data, &cfg);
    d.cli_ok(&[
        "volume",
        "create",
        "u",
        "96M",
        "--block-size",
        &block.to_string(),
    ]);
    let model = dir.join("model");
    let (model, block) = (model.to_str().unwrap(), block.to_string());
    let phase = |d: &Daemon, phase: &str| {
        let uri = d.uri("u");
        let env = [
            ("TESSEL_URI", uri.as_str()),
            ("BLOCK", block.as_str()),
            ("MODEL", model),
            ("PHASE", phase),
            ("SEED", block.as_str()),
        ];
        script(UNALIGNED, &env);
    };
    phase(&d, "write");
    // Everything was flushed: a crash loses none of it.
    d.kill9();
    let d = daemon(&data, &cfg);
    phase(&d, "check");
}

#[test]
fn unaligned_requests_on_a_4096_byte_volume_match_a_model_across_a_crash() {
    // 1 MiB clusters: 16 KiB grains, so the aligned writers' blocks share grains with the
    // blocks written inside.
    unaligned_requests_match_a_model_across_a_crash(4096, "1M");
}

#[test]
fn unaligned_requests_on_a_512_byte_volume_match_a_model_across_a_crash() {
    unaligned_requests_match_a_model_across_a_crash(512, "64K");
}

fn transaction_log_holds_on(block: u32) {
    if nbdsh().is_none() {
        return;
    }
    let dir = TestDir::new(&format!("nbd-txlog-{block}"));
    let cfg = config(&dir.path, &[]);
    let data = dir.join("data");
    let mut d = daemon(&data, &cfg);
    d.cli_ok(&[
        "volume",
        "create",
        "t",
        "16M",
        "--block-size",
        &block.to_string(),
    ]);
    let log = dir.join("log");
    let (log, seed) = (log.to_str().unwrap(), block.to_string());
    let uri = d.uri("t");
    let out = script(
        TXLOG,
        &[
            ("TESSEL_URI", &uri),
            ("SEED", &seed),
            ("LOG", log),
            ("PHASE", "run"),
        ],
    );
    common::say(&format!("nbd txlog on {block}-byte blocks: {}", out.trim()));
    d.kill9();
    let d = daemon(&data, &cfg);
    let uri = d.uri("t");
    script(
        TXLOG,
        &[
            ("TESSEL_URI", &uri),
            ("SEED", &seed),
            ("LOG", log),
            ("PHASE", "check"),
        ],
    );
}

#[test]
fn transaction_log_holds_for_pipelined_connections_on_4096_byte_blocks() {
    transaction_log_holds_on(4096);
}

#[test]
fn transaction_log_holds_for_pipelined_connections_on_512_byte_blocks() {
    transaction_log_holds_on(512);
}

/// nbdsh script: with `require_block_size = true`, a client that asks for no block size is
/// refused at NBD_OPT_GO, one that asks is served.
const REFUSED: &str = r#"
import nbd, os
uri = os.environ["TESSEL_URI"]
h = nbd.NBD()
h.set_request_block_size(False)
try:
    h.connect_uri(uri)
except nbd.Error as e:
    print("refused:", e)
else:
    raise AssertionError("a client without NBD_INFO_BLOCK_SIZE entered transmission")
g = nbd.NBD()
g.connect_uri(uri)
assert g.get_block_size(nbd.SIZE_MINIMUM) == 4096
g.pwrite(b"\x11" * 4096, 0)
assert g.pread(4096, 0) == b"\x11" * 4096
g.shutdown()
print("ok")
"#;

#[test]
fn require_block_size_refuses_clients_that_negotiate_none() {
    if nbdsh().is_none() {
        return;
    }
    let dir = TestDir::new("nbd-require-bs");
    let cfg = config(
        &dir.path,
        &[("require_block_size = false", "require_block_size = true")],
    );
    let mut d = daemon(&dir.join("data"), &cfg);
    let uri = d.uri("vol0");
    let out = script(REFUSED, &[("TESSEL_URI", &uri)]);
    assert!(out.contains("refused:"), "{out}");
    // NBD_OPT_EXPORT_NAME cannot carry block sizes: the connection is closed, nothing sent.
    let mut s = raw_nbd::greeted(&d.nbd_addr());
    use std::io::Write;
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&4u32.to_be_bytes());
    opt.extend_from_slice(b"vol0");
    s.write_all(&opt).unwrap();
    assert!(
        raw_nbd::closed_by_peer(&mut s),
        "NBD_OPT_EXPORT_NAME served"
    );
    assert!(d.healthy(), "{}", d.stderr());
}

/// nbdsh script: the protocol's other defaults and limits, as a client that negotiated no
/// block size meets them (structured replies on, libnbd's checks off).
const DEFAULTS: &str = r#"
import errno, nbd, os
uri = os.environ["TESSEL_URI"]
MIB = 1 << 20
h = nbd.NBD()
h.set_strict_mode(0)
h.set_request_block_size(False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert h.get_structured_replies_negotiated()
# The 1 MiB + 14 byte read at offset 1 that nbd-server's tester sends.
h.pwrite(b"\x5a" * (2 * MIB), 0)
assert h.pread(MIB + 14, 1) == b"\x5a" * (MIB + 14)
# Reads and writes past 32 MiB: one request, one reply (data in 32 MiB chunks).
data = bytes(range(256)) * (40 * MIB // 256)
h.pwrite(data, 3 * MIB + 5)
assert h.pread(len(data), 3 * MIB + 5) == data
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf)))
    return 0
got = h.pread_structured(len(data), 3 * MIB + 5, chunk)
assert got == data and len(chunks) == 2, chunks
# NBD_CMD_FLAG_DF: one chunk, whatever the length.
chunks.clear()
h.pread_structured(len(data), 3 * MIB + 5, chunk, nbd.CMD_FLAG_DF)
assert len(chunks) == 1, chunks
# TRIM and WRITE_ZEROES beyond 32 MiB, unaligned, in one request each.
h.zero(40 * MIB - 3, 3 * MIB + 7)
assert h.pread(40 * MIB - 3, 3 * MIB + 7) == bytes(40 * MIB - 3)
h.trim(200 * MIB + 1, 50 * MIB)
# BLOCK_STATUS over the whole export without REQ_ONE: consecutive extents from the start,
# none past the request.
extents = []
def status(context, offset, entries, err):
    extents.append((offset, entries))
    return 0
h.block_status(min(size, 0xffffffff), 0, status)
(offset, entries), = extents
assert offset == 0 and len(entries) % 2 == 0 and len(entries) >= 2, extents
total = sum(entries[0::2])
assert 0 < total <= min(size, 0xffffffff), total
assert entries[1] & nbd.STATE_HOLE == 0, "the data written first is allocated"
assert h.pread(3, 1) == b"\x5a" * 3
h.shutdown()
print("ok")
"#;

#[test]
fn protocol_defaults_past_32_mib_and_huge_block_status_are_served() {
    if nbdsh().is_none() {
        return;
    }
    let mut d = Daemon::start("nbd-defaults");
    let uri = d.uri("vol0");
    script(DEFAULTS, &[("TESSEL_URI", &uri)]);
    assert!(d.healthy(), "{}", d.stderr());
}
