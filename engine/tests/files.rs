//! Pools on real devices: files through io_uring O_DIRECT (one or several per pool), a loop
//! device where one can be made, and the checks that keep tessel from opening or formatting
//! the wrong device.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use tessel_engine::format::{Superblock, SB_SIZE};
use tessel_engine::*;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("tessel-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        Scratch(d)
    }
    fn file(&self, name: &str, size: u64) -> DeviceSpec {
        DeviceSpec::Path {
            path: self.0.join(name),
            create_size: Some(size),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Tests that run other programs hold this for writing, the others for reading. A child
/// process inherits this process's open files (pool device locks included) from its fork
/// until its exec closes them, so a pool closed by one test while another test starts
/// `losetup` can look "in use by another process" to the next open for that moment.
static SPAWNING: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn no_spawns() -> std::sync::RwLockReadGuard<'static, ()> {
    SPAWNING.read().unwrap_or_else(|p| p.into_inner())
}

fn path_of(d: &DeviceSpec) -> PathBuf {
    d.display()
}

/// Write `chunks` chunks of `chunk` bytes with a pattern, then read them back.
fn fill_and_check(e: &Engine, name: &str, chunk: u64, chunks: u64, gen: u8) {
    let v = e.volume(name).expect("volume");
    let mut c = e.client();
    for k in 0..chunks {
        write(
            &mut c,
            v.id,
            k * chunk,
            &pattern(k * chunk, chunk as usize, gen),
        );
    }
    flush(&mut c, v.id);
    check(e, name, chunk, chunks, gen);
}

fn check(e: &Engine, name: &str, chunk: u64, chunks: u64, gen: u8) {
    let v = e.volume(name).expect("volume");
    let mut c = e.client();
    for k in 0..chunks {
        assert!(
            read(&mut c, v.id, k * chunk, chunk) == pattern(k * chunk, chunk as usize, gen),
            "{name}: chunk {k} differs"
        );
    }
}

#[test]
fn a_pool_spans_two_files_and_survives_reopen_in_any_order() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("two");
    let a = s.file("a.img", 40 << 20);
    let b = s.file("b.img", 24 << 20);
    Engine::format(&[a.clone(), b.clone()], &small_opts()).expect("format");
    let e = Engine::open(&[a.clone(), b.clone()], cfg(2)).expect("open");
    let info = e.pool_info();
    assert_eq!(info.devices.len(), 2);
    // More than member 0's data region, so clusters land on both files.
    let size = 20 << 20;
    assert!(info.total_bytes > size);
    e.create_volume("wide", size, 4096).expect("create");
    fill_and_check(&e, "wide", 256 << 10, size / (256 << 10), 5);
    assert_eq!(e.pool_info().used_bytes, size);
    e.shutdown().expect("shutdown");
    drop(e);
    // Members are found by their superblocks, not by the order given.
    let e = Engine::open(&[b, a], cfg(1)).expect("reopen swapped");
    check(&e, "wide", 256 << 10, size / (256 << 10), 5);
    e.shutdown().expect("shutdown");
}

#[test]
fn a_missing_or_foreign_member_is_refused_naming_the_device() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("members");
    let a = s.file("a.img", 32 << 20);
    let b = s.file("b.img", 16 << 20);
    let other = s.file("other.img", 32 << 20);
    Engine::format(&[a.clone(), b.clone()], &small_opts()).expect("format");
    Engine::format(std::slice::from_ref(&other), &small_opts()).expect("format other");
    match Engine::open(std::slice::from_ref(&a), cfg(1)) {
        Err(PoolError::Membership { device, reason }) => {
            assert_eq!(device, path_of(&a));
            assert!(reason.contains("2 devices"), "{reason}");
        }
        Err(e) => panic!("wrong error for a missing member: {e}"),
        Ok(_) => panic!("opened a pool with a member missing"),
    }
    match Engine::open(&[a.clone(), other.clone()], cfg(1)) {
        Err(PoolError::Membership { device, reason }) => {
            assert_eq!(device, path_of(&other));
            assert!(reason.contains("belongs to pool"), "{reason}");
        }
        Err(e) => panic!("wrong error for a foreign member: {e}"),
        Ok(_) => panic!("opened a pool with a foreign member"),
    }
    // The same device twice: its second open finds it locked.
    match Engine::open(&[a.clone(), a.clone()], cfg(1)) {
        Err(PoolError::Locked { device }) | Err(PoolError::Membership { device, .. }) => {
            assert_eq!(device, path_of(&a))
        }
        Err(e) => panic!("wrong error for a member given twice: {e}"),
        Ok(_) => panic!("opened a pool with a member given twice"),
    }
    // A device that does not exist is named.
    let gone = DeviceSpec::path(s.0.join("gone.img"));
    match Engine::open(&[a.clone(), gone.clone()], cfg(1)) {
        Err(PoolError::Io { device, .. }) => assert_eq!(device, path_of(&gone)),
        Err(e) => panic!("wrong error for a missing file: {e}"),
        Ok(_) => panic!("opened a missing file"),
    }
    // The whole pool still opens.
    Engine::open(&[a, b], cfg(1))
        .expect("open")
        .shutdown()
        .unwrap();
}

fn write_at(path: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

#[test]
fn a_filesystem_signature_needs_force_to_format() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("ext4");
    let dev = s.file("fs.img", 32 << 20);
    let p = path_of(&dev);
    std::fs::File::create(&p)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    write_at(&p, 1080, &[0x53, 0xEF]);
    match Engine::format(std::slice::from_ref(&dev), &small_opts()) {
        Err(PoolError::InUse { device, what }) => {
            assert_eq!(device, p);
            assert!(what.contains("ext"), "{what}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("formatted over an ext4 signature without force"),
    }
    let forced = FormatOptions {
        force: true,
        ..small_opts()
    };
    Engine::format(std::slice::from_ref(&dev), &forced).expect("forced format");
    let e = Engine::open(&[dev], cfg(1)).expect("open");
    e.create_volume("v", 1 << 20, 512).unwrap();
    fill_and_check(&e, "v", 64 << 10, 16, 1);
    e.shutdown().unwrap();
}

#[test]
fn a_corrupted_superblock_is_refused_not_repaired() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("sb");
    let dev = s.file("pool.img", 32 << 20);
    let p = path_of(&dev);
    Engine::format(std::slice::from_ref(&dev), &small_opts()).expect("format");
    let good = read_at(&p, 0, 2 * SB_SIZE);
    // The primary copy alone damaged: the second copy serves.
    write_at(&p, 100, &[good[100] ^ 0xFF]);
    Engine::open(std::slice::from_ref(&dev), cfg(1))
        .expect("open with the second superblock copy")
        .shutdown()
        .unwrap();
    // Both damaged: refused with the device's name, and left as it was.
    write_at(&p, (SB_SIZE + 100) as u64, &[good[SB_SIZE + 100] ^ 0xFF]);
    let before = read_at(&p, 0, 2 * SB_SIZE);
    match Engine::open(std::slice::from_ref(&dev), cfg(1)) {
        Err(PoolError::BadChecksum { device }) => assert_eq!(device, p),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a pool whose superblocks fail their checksum"),
    }
    assert_eq!(
        read_at(&p, 0, 2 * SB_SIZE),
        before,
        "superblocks were rewritten"
    );
    let msg = match Engine::open(std::slice::from_ref(&dev), cfg(1)) {
        Err(e) => e.to_string(),
        Ok(_) => unreachable!(),
    };
    assert!(
        msg.contains(&p.display().to_string()) && msg.contains("checksum"),
        "{msg}"
    );
}

#[test]
fn an_unknown_format_version_is_refused() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("ver");
    let dev = s.file("pool.img", 32 << 20);
    let p = path_of(&dev);
    Engine::format(std::slice::from_ref(&dev), &small_opts()).expect("format");
    let mut sb = Superblock::decode(&read_at(&p, 0, SB_SIZE)).expect("superblock");
    sb.version = 99;
    let enc = sb.encode();
    write_at(&p, 0, &enc);
    write_at(&p, SB_SIZE as u64, &enc);
    match Engine::open(std::slice::from_ref(&dev), cfg(1)) {
        Err(PoolError::UnknownVersion { device, version }) => {
            assert_eq!((device, version), (p.clone(), 99));
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a pool of an unknown version"),
    }
    // Formatting over it still needs force: it is somebody's pool.
    assert!(matches!(
        Engine::format(std::slice::from_ref(&dev), &small_opts()),
        Err(PoolError::InUse { .. })
    ));
}

#[test]
fn a_device_too_small_for_the_metadata_is_refused() {
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("small");
    let dev = s.file("tiny.img", 8 << 20);
    assert!(matches!(
        Engine::format(&[dev], &small_opts()),
        Err(PoolError::Geometry(_))
    ));
}

/// A loop device attached for the test's lifetime, detached on drop.
struct Loop(String);

impl Loop {
    /// Attach `file`, with `extra` losetup options.
    fn attach(file: &Path, extra: &[&str]) -> Result<Loop, String> {
        if !Path::new("/dev/loop-control").exists() {
            return Err("no /dev/loop-control".into());
        }
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .args(extra)
            .arg(file)
            .output()
            .or_else(|_| {
                Command::new("losetup")
                    .args(["-f", "--show"])
                    .args(extra)
                    .arg(file)
                    .output()
            })
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() || !Path::new(&dev).exists() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
            return Err(format!("losetup gave '{dev}', which does not exist here"));
        }
        Ok(Loop(dev))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A loop device over a 48 MiB file in `s`; None (the skip said why) where there is none.
fn loop_device(s: &Scratch) -> Option<Loop> {
    loop_device_with(s, "backing.img", &[])
}

/// A loop device over a 48 MiB file `name` in `s`, attached with `extra` losetup options.
fn loop_device_with(s: &Scratch, name: &str, extra: &[&str]) -> Option<Loop> {
    let backing = s.0.join(name);
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    Loop::attach(&backing, extra)
        .map_err(|why| skip(&format!("no loop device ({extra:?}): {why}")))
        .ok()
}

/// 512-byte blocks of a volume at offsets that are not on 4 KiB boundaries, and one
/// read across a 4 KiB boundary.
fn small_blocks_check(e: &Engine, name: &str, gen: u8) {
    let v = e.volume(name).expect("volume");
    let mut c = e.client();
    for k in 0..32u64 {
        let off = k * 8192 + 512 * (k % 8);
        assert_eq!(
            read(&mut c, v.id, off, 512),
            pattern(off, 512, gen),
            "block at {off}"
        );
    }
    // Block 7's write ends its 4 KiB sector; the next sector was never written.
    let off = 7 * 8192 + 3584;
    let mut across = pattern(off, 512, gen);
    across.extend(vec![0; 512]);
    assert_eq!(read(&mut c, v.id, off, 1024), across);
}

/// A 4Kn device (4096-byte logical sectors, where a 512-byte O_DIRECT transfer fails with
/// EINVAL): the pool formats and opens on it; a 4096-byte volume and a 512-byte volume read
/// back what was written, 512-byte blocks at any offset included (reads that are not on the
/// device's sectors go through a bounce buffer), also after a reopen. A device whose sectors
/// are larger than 4096 bytes is refused with a typed error naming it.
#[test]
fn a_4kn_device_serves_512_byte_blocks_and_a_larger_sector_is_refused() {
    let _w = watchdog();
    let _guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new("4kn");
    let Some(lo) = loop_device_with(&s, "4kn.img", &["--sector-size", "4096"]) else {
        return;
    };
    let dev = DeviceSpec::path(&lo.0);
    Engine::format(std::slice::from_ref(&dev), &small_opts()).expect("format 4Kn device");
    let e = Engine::open(std::slice::from_ref(&dev), cfg(2)).expect("open 4Kn device");
    e.create_volume("v4k", 4 << 20, 4096).unwrap();
    e.create_volume("v512", 4 << 20, 512).unwrap();
    fill_and_check(&e, "v4k", 128 << 10, 16, 3);
    {
        let v = e.volume("v512").expect("volume");
        let mut c = e.client();
        for k in 0..32u64 {
            let off = k * 8192 + 512 * (k % 8);
            write(&mut c, v.id, off, &pattern(off, 512, 5));
        }
        flush(&mut c, v.id);
    }
    small_blocks_check(&e, "v512", 5);
    e.shutdown().unwrap();
    drop(e);
    let e = Engine::open(std::slice::from_ref(&dev), cfg(1)).expect("reopen 4Kn device");
    check(&e, "v4k", 128 << 10, 16, 3);
    small_blocks_check(&e, "v512", 5);
    e.shutdown().unwrap();
    drop(e);
    drop(lo);

    let Some(big) = loop_device_with(&s, "8k.img", &["--sector-size", "8192"]) else {
        return;
    };
    let dev = DeviceSpec::path(&big.0);
    match Engine::format(std::slice::from_ref(&dev), &small_opts()) {
        Err(PoolError::SectorSize { device, sector }) => {
            assert_eq!((device, sector), (PathBuf::from(&big.0), 8192));
        }
        other => panic!("an 8 KiB-sector device must be refused: {:?}", other.err()),
    }
}

#[test]
fn a_pool_on_a_loop_device() {
    let _w = watchdog();
    let _guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new("loop");
    let Some(lo) = loop_device(&s) else {
        return;
    };
    let dev = DeviceSpec::path(&lo.0);
    Engine::format(std::slice::from_ref(&dev), &small_opts()).expect("format loop device");
    let e = Engine::open(std::slice::from_ref(&dev), cfg(2)).expect("open loop device");
    assert_eq!(e.pool_info().devices, vec![lo.0.clone()]);
    e.create_volume("lv", 4 << 20, 4096).unwrap();
    fill_and_check(&e, "lv", 128 << 10, 32, 7);
    e.shutdown().unwrap();
    drop(e);
    let e = Engine::open(std::slice::from_ref(&dev), cfg(1)).expect("reopen loop device");
    check(&e, "lv", 128 << 10, 32, 7);
    e.shutdown().unwrap();
    drop(e);
    // The pool is on the backing file too; formatting over it needs force.
    assert!(matches!(
        Engine::format(&[dev], &small_opts()),
        Err(PoolError::InUse { .. })
    ));
}

#[test]
fn a_block_device_in_use_is_refused_through_another_device_node() {
    let _w = watchdog();
    let _guard = SPAWNING.write().unwrap_or_else(|p| p.into_inner());
    let s = Scratch::new("alias");
    let Some(lo) = loop_device(&s) else {
        return;
    };
    // A second node with the device's major:minor, as a container might be given.
    let alias = s.0.join("alias");
    let rdev = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&lo.0).unwrap().rdev()
    };
    let c = std::ffi::CString::new(alias.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod with a valid NUL-terminated path.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFBLK | 0o600, rdev) } != 0 {
        skip(&format!(
            "cannot mknod a device node: {}",
            std::io::Error::last_os_error()
        ));
        return;
    }
    let dev = DeviceSpec::path(&lo.0);
    Engine::format(std::slice::from_ref(&dev), &small_opts()).expect("format loop device");
    let e = Engine::open(std::slice::from_ref(&dev), cfg(1)).expect("open loop device");
    let second = Engine::open(&[DeviceSpec::path(&alias)], cfg(1));
    assert!(
        matches!(&second, Err(PoolError::Busy { device }) if *device == alias),
        "a second engine through another node must be refused: {:?}",
        second.as_ref().err()
    );
    let text = second.err().unwrap().to_string();
    assert!(text.contains("another device node"), "{text}");
    e.shutdown().unwrap();
    drop(e);
    // Released with the engine: the other node opens now.
    let e = Engine::open(&[DeviceSpec::path(&alias)], cfg(1)).expect("open through the alias");
    e.shutdown().unwrap();
}

#[test]
fn a_created_pool_file_is_private_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let _w = watchdog();
    let _guard = no_spawns();
    let s = Scratch::new("mode");
    let dev = s.file("pool.img", 64 << 20);
    // SAFETY: umask only swaps the process's file mode mask.
    let old = unsafe { libc::umask(0) };
    let formatted = Engine::format(std::slice::from_ref(&dev), &small_opts());
    // SAFETY: as above, restoring it.
    unsafe { libc::umask(old) };
    formatted.expect("format");
    let mode = std::fs::metadata(path_of(&dev))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "pool file mode {mode:o}");
}

/// 1 MiB clusters track validity in 16 KiB grains: 4 KiB writes to fresh clusters and to
/// clusters a snapshot shares are merged with the rest of their grain (read from the old
/// cluster, or zeros) through io_uring O_DIRECT, and the volume, its snapshot and both
/// after a reopen read exactly what was written. The pool is small (37 clusters), and both
/// reactors allocate from it.
#[test]
fn large_clusters_merge_small_writes_into_their_grain() {
    let _w = watchdog();
    const MIB: u64 = 1 << 20;
    let _guard = no_spawns();
    let s = Scratch::new("grain");
    let f = s.file("g.img", 64 * MIB);
    let opts = FormatOptions {
        cluster_size: MIB as u32,
        shard_size: 4 * MIB,
        ..small_opts()
    };
    Engine::format(std::slice::from_ref(&f), &opts).expect("format");
    let e = Engine::open(std::slice::from_ref(&f), cfg(2)).expect("open");
    // 37 clusters of 1 MiB for two reactors: each must own some of them.
    assert_eq!(e.pool_info().total_bytes, 37 * MIB);
    let size = 8 * MIB;
    let v = e.create_volume("g", size, 4096).expect("create").id;
    let mut c = e.client();
    let mut model = vec![0u8; size as usize];
    let put = |c: &mut Client, model: &mut [u8], off: u64, gen: u8| {
        let d = pattern(off, 4096, gen);
        write(c, v, off, &d);
        model[off as usize..off as usize + 4096].copy_from_slice(&d);
    };
    // Scattered 4 KiB blocks, most of them alone in their grain.
    let offs: Vec<u64> = (0..64u64).map(|k| (k * 131 + 7) % 2048 * 4096).collect();
    for &o in &offs {
        put(&mut c, &mut model, o, 1);
    }
    flush(&mut c, v);
    let snap = e.snapshot_create("g", "s").expect("snapshot").id;
    let at_snap = model.clone();
    // After the snapshot: the block next to every other one (same grain or the next) and
    // half of the blocks themselves, each a redirect that keeps the rest of its grain.
    for &o in offs.iter().step_by(2) {
        put(&mut c, &mut model, (o + 4096) % size, 2);
        put(&mut c, &mut model, o, 3);
    }
    flush(&mut c, v);
    drop(c);
    let read_all = |e: &Engine, id: VolumeId| {
        let mut c = e.client();
        (0..size / MIB)
            .flat_map(|k| read(&mut c, id, k * MIB, MIB))
            .collect::<Vec<u8>>()
    };
    assert!(read_all(&e, v) == model, "volume differs");
    assert!(read_all(&e, snap) == at_snap, "snapshot differs");
    e.shutdown().expect("shutdown");
    drop(e);
    let e = Engine::open(&[f], cfg(1)).expect("reopen");
    assert!(read_all(&e, v) == model, "volume differs after reopen");
    assert!(
        read_all(&e, snap) == at_snap,
        "snapshot differs after reopen"
    );
    e.shutdown().expect("shutdown");
}
