//! The powercut fs mounted for real: O_DIRECT writes, fdatasync and RWF_DSYNC reach it as
//! the kernel sends them, and a power cut keeps exactly what was made durable.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use tessel_powercut::{Disk, Mounted};

/// Mounting needs /dev/fuse and CAP_SYS_ADMIN: without FUSE, skip saying so, or fail under
/// TESSEL_REQUIRE_TOOLS (tools/test and CI), as tessel's own integration tests do.
fn mount_dir(label: &str) -> Option<PathBuf> {
    if !std::path::Path::new("/dev/fuse").exists() {
        let required =
            std::env::var_os("TESSEL_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty() && v != "0");
        assert!(
            !required,
            "{label}: no /dev/fuse, and TESSEL_REQUIRE_TOOLS is set"
        );
        let _ = writeln!(std::io::stderr(), "SKIPPED {label}: no /dev/fuse");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("powercut-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Some(dir)
}

/// 64 KiB aligned for O_DIRECT.
#[repr(C, align(4096))]
struct Aligned([u8; 64 << 10]);

/// An aligned buffer filled with `byte`.
fn aligned(byte: u8) -> Box<Aligned> {
    Box::new(Aligned([byte; 64 << 10]))
}

#[test]
fn fdatasync_and_dsync_writes_survive_the_cut_and_later_writes_may_not() {
    let Some(dir) = mount_dir("sync") else { return };
    let m = Mounted::mount(&dir, Disk::default()).expect("mount the powercut fs");
    let path = dir.join("pool.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .expect("create O_DIRECT");
    f.set_len(1 << 20).unwrap();
    f.write_all_at(&aligned(1).0[..8192], 0).unwrap();
    f.sync_data().unwrap();
    let two = aligned(2);
    let two = &two.0[..4096];
    let iov = libc::iovec {
        iov_base: two.as_ptr() as *mut _,
        iov_len: two.len(),
    };
    // SAFETY: one iovec over a live, aligned buffer.
    let n = unsafe { libc::pwritev2(f.as_raw_fd(), &iov, 1, 8192, libc::RWF_DSYNC) };
    assert_eq!(n, 4096, "pwritev2: {}", std::io::Error::last_os_error());
    f.write_all_at(&aligned(3).0, 64 << 10).unwrap();
    let mut back = aligned(0);
    f.read_exact_at(&mut back.0[..4096], 64 << 10).unwrap();
    assert!(
        back.0[..4096].iter().all(|&b| b == 3),
        "reads see volatile writes"
    );

    let stats = m.stats();
    assert_eq!(stats.writes, 3, "{stats:?}");
    assert_eq!(stats.dsync_writes, 1, "{stats:?}");
    assert!(stats.fsyncs >= 1, "{stats:?}");

    let (image, report) = m.power_cut(7);
    assert!(
        f.write_all_at(&aligned(4).0[..4096], 0).is_err(),
        "EIO after the cut"
    );
    drop(f);
    drop(m);
    assert_eq!(report.volatile, 1, "{report:?}");
    assert_eq!(image.size("pool.img"), Some(1 << 20));
    let mut b = vec![0u8; 12288];
    image.read("pool.img", 0, &mut b);
    assert!(b[..8192].iter().all(|&x| x == 1), "fdatasync'd write kept");
    assert!(b[8192..].iter().all(|&x| x == 2), "RWF_DSYNC write kept");

    // Power back on: the image is what the next mount serves.
    let m = Mounted::mount(&dir, image).expect("mount again");
    let mut b = aligned(0);
    let b = &mut b.0[..4096];
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    f.read_exact_at(b, 8192).unwrap();
    assert!(b.iter().all(|&x| x == 2));
    drop(f);
    drop(m);
    let _ = std::fs::remove_dir(&dir);
}
