//! A broken configuration file stops `tessel serve` before it listens or touches the data
//! directory, and the message names the file, the line and the key.

mod common;

use common::{free_port, TestDir, TESSEL};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Run `tessel serve --config FILE`, which must fail before anything starts; its stderr.
fn serve_refuses(file: &Path, data: &Path) -> String {
    let port = free_port();
    let out = common::run_timeout(
        Command::new(TESSEL)
            .arg("serve")
            .arg("--config")
            .arg(file)
            .arg("--data-dir")
            .arg(data)
            .arg("--nbd-listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--iscsi-listen")
            .arg(""),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a broken config was accepted:\n{stderr}"
    );
    assert!(
        !data.exists(),
        "the data dir was created before the config was checked"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "something listens on the NBD port"
    );
    assert!(
        stderr.contains(&file.display().to_string()),
        "file not named:\n{stderr}"
    );
    stderr
}

/// Write `text` as a config file and check that `tessel serve` refuses it; (stderr, file).
fn refused(label: &str, text: &str) -> (String, String) {
    let dir = TestDir::new(label);
    let file = dir.join("tessel.toml");
    std::fs::write(&file, text).unwrap();
    let stderr = serve_refuses(&file, &dir.join("data"));
    (stderr, file.display().to_string())
}

const VALID_HEAD: &str = "\
[engine]
cores = \"all\"
poll = \"adaptive\"
";

#[test]
fn unknown_key_is_refused_with_file_line_and_key() {
    let text = format!("{VALID_HEAD}colour = \"blue\"\n\n[nbd]\nlisten = \"127.0.0.1:10809\"\n");
    let (stderr, file) = refused("config-unknown", &text);
    assert!(
        stderr.contains(&format!("{file}:4")),
        "line 4 not named:\n{stderr}"
    );
    assert!(stderr.contains("colour"), "key not named:\n{stderr}");
    assert!(
        stderr.contains("unknown"),
        "does not say it is unknown:\n{stderr}"
    );
}

#[test]
fn unknown_key_in_an_array_of_tables_is_refused() {
    let text = "\
[[pool]]
name = \"default\"
devices = [\"pool0.img\"]
create_size = \"1G\"
formatt = \"if-empty\"
";
    let (stderr, file) = refused("config-unknown-pool", text);
    assert!(
        stderr.contains(&format!("{file}:5")),
        "line 5 not named:\n{stderr}"
    );
    assert!(stderr.contains("formatt"), "key not named:\n{stderr}");
}

#[test]
fn wrong_type_is_refused_with_file_line_and_key() {
    let text = format!("{VALID_HEAD}ring_entries = \"many\"\n");
    let (stderr, file) = refused("config-type", &text);
    assert!(
        stderr.contains(&format!("{file}:4")),
        "line 4 not named:\n{stderr}"
    );
    assert!(stderr.contains("ring_entries"), "key not named:\n{stderr}");
    assert!(
        stderr.contains("expected"),
        "does not say what was expected:\n{stderr}"
    );
}

#[test]
fn bad_value_is_refused_with_file_line_and_key() {
    let text = "[nbd]\nlisten = \"localhost\"\n";
    let (stderr, file) = refused("config-value", text);
    assert!(
        stderr.contains(&format!("{file}:2")),
        "line 2 not named:\n{stderr}"
    );
    assert!(stderr.contains("listen"), "key not named:\n{stderr}");
}

#[test]
fn cores_that_are_not_online_and_endless_spins_are_refused_with_line_and_key() {
    let (stderr, file) = refused(
        "config-cores",
        "[engine]\npoll = \"adaptive\"\ncores = [0, 99]\n",
    );
    assert!(
        stderr.contains(&format!("{file}:3")),
        "line not named:\n{stderr}"
    );
    assert!(stderr.contains("engine.cores"), "key not named:\n{stderr}");
    assert!(stderr.contains("core 99 is not online"), "{stderr}");
    let (stderr, file) = refused("config-spin", "[engine]\nspin_us = 9223372036854775807\n");
    assert!(
        stderr.contains(&format!("{file}:2")),
        "line not named:\n{stderr}"
    );
    assert!(
        stderr.contains("engine.spin_us"),
        "key not named:\n{stderr}"
    );
}

#[test]
fn missing_config_file_is_refused_with_its_path() {
    let dir = TestDir::new("config-missing");
    serve_refuses(&dir.join("nope.toml"), &dir.join("data"));
}
