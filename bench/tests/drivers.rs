//! tessel-bench end to end on a memory pool, with both job drivers: the verify workload
//! writes a pattern over the whole volume and reads it back, so a request lost, answered to
//! the wrong job or completed with the wrong buffer fails the run.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Longest a run may take: a hang (in the engine's shutdown, say) fails the test instead of
/// holding up the suite.
const LIMIT: Duration = Duration::from_secs(60);

/// Run tessel-bench with `--json` on `device` with a volume of `size`, plus `args`; it must
/// succeed within `LIMIT`. Returns its report.
fn bench_on(device: &str, size: &str, args: &[&str]) -> serde_json::Value {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessel-bench"))
        .args(["--device", device, "--size", size, "--json"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tessel-bench");
    let deadline = Instant::now() + LIMIT;
    while child.try_wait().expect("wait for tessel-bench").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("tessel-bench {args:?} did not finish within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child
        .wait_with_output()
        .expect("collect tessel-bench's output");
    assert!(
        out.status.success(),
        "tessel-bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report on stdout")
}

/// tessel-bench on a 64 MiB memory pool.
fn bench(args: &[&str]) -> serde_json::Value {
    bench_on("mem", "64M", args)
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
    let r = bench_on("null", "4G", &["--workload", "randwrite", "--time", "1.5"]);
    assert_eq!(r["errors"], 0, "{r}");
}
