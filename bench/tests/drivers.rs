//! tessel-bench end to end on a memory pool, with both job drivers: the verify workload
//! writes a pattern over the whole volume and reads it back, so a request lost, answered to
//! the wrong job or completed with the wrong buffer fails the run.

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tessel-bench"))
        .args(["--device", "mem", "--size", "64M", "--json"])
        .args(args)
        .output()
        .expect("run tessel-bench");
    assert!(
        out.status.success(),
        "tessel-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report on stdout")
}

#[test]
fn verify_passes_with_each_driver_and_core_count() {
    for driver in ["reactor", "thread"] {
        for cores in ["1", "2"] {
            let r = bench(&[
                "--workload",
                "verify",
                "--driver",
                driver,
                "--cores",
                cores,
                "--qd",
                "16",
            ]);
            assert_eq!(r["errors"], 0, "{driver} x{cores}: {r}");
            // One write and one read of every 4 KiB block of the 64 MiB volume.
            assert_eq!(r["ops"], 2 * 64 * 256, "{driver} x{cores}: {r}");
        }
    }
}

#[test]
fn timed_randread_counts_requests_and_latency() {
    for driver in ["reactor", "thread"] {
        let r = bench(&[
            "--workload",
            "randread",
            "--driver",
            driver,
            "--time",
            "0.5",
            "--qd",
            "8",
        ]);
        assert_eq!(r["errors"], 0, "{driver}: {r}");
        assert!(r["ops"].as_u64().unwrap() > 100, "{driver}: {r}");
        let (p50, max) = (&r["lat_us"]["p50"], &r["lat_us"]["max"]);
        assert!(p50.as_f64().unwrap() > 0.0, "{driver}: {r}");
        assert!(
            max.as_f64().unwrap() >= p50.as_f64().unwrap(),
            "{driver}: {r}"
        );
    }
}

/// Random 4 KiB writes over an unwritten null-device volume journal a record per write (a
/// new cluster or a newly valid block) at a million a second, so journal rings are full when
/// the run ends; the engine's shutdown must still flush and return (it used to hang once the
/// housekeeper had stopped, waiting for a checkpoint nobody took).
#[test]
fn shutdown_after_a_journal_heavy_run_returns() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessel-bench"))
        .args(["--device", "null", "--size", "4G", "--json"])
        .args(["--workload", "randwrite", "--time", "1.5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run tessel-bench");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for tessel-bench") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tessel-bench did not finish within 60 s (shutdown hung)");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "tessel-bench failed: {status}");
    let mut stdout = Vec::new();
    std::io::Read::read_to_end(&mut child.stdout.take().expect("stdout"), &mut stdout)
        .expect("read the report");
    let r: serde_json::Value = serde_json::from_slice(&stdout).expect("JSON report");
    assert_eq!(r["errors"], 0, "{r}");
}
