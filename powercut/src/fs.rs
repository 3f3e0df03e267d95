//! The FUSE side: one flat directory of regular files over a [`Recorder`], answered by one
//! thread (fuser's default), so requests are recorded in exactly the order they are answered.

use crate::image::{CrashReport, Disk, PoweredOff, Recorder, Stats};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attributes are never cached by the kernel: sizes change under it (set_len).
const TTL: Duration = Duration::ZERO;

/// The powercut fs mounted on a directory; unmounted (lazily) when dropped.
pub struct Mounted {
    dir: PathBuf,
    recorder: Arc<Mutex<Recorder>>,
    session: Option<BackgroundSession>,
}

impl Mounted {
    /// Mount a powercut fs holding `disk` (all of it durable) on `dir`, an existing empty
    /// directory. Needs CAP_SYS_ADMIN and /dev/fuse.
    pub fn mount(dir: &Path, disk: Disk) -> io::Result<Mounted> {
        let names: Vec<String> = disk.names().map(str::to_string).collect();
        let recorder = Arc::new(Mutex::new(Recorder::new(disk)));
        let fs = PowercutFs {
            recorder: recorder.clone(),
            inodes: Mutex::new(names),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powercut".to_string()),
            MountOption::NoDev,
            MountOption::NoSuid,
        ];
        let session = fuser::Session::new(fs, dir, &config)?.spawn()?;
        Ok(Mounted {
            dir: dir.to_path_buf(),
            recorder,
            session: Some(session),
        })
    }

    /// Cut the power: every later request fails with EIO; returns the image the disk holds
    /// when power comes back (seeded) and what the cut did to the volatile writes.
    pub fn power_cut(&self, seed: u64) -> (Disk, CrashReport) {
        lock(&self.recorder).power_cut(seed)
    }

    /// What the filesystem saw so far.
    pub fn stats(&self) -> Stats {
        lock(&self.recorder).stats()
    }

    /// The files as a reader sees them now (a clean shutdown's image).
    pub fn current(&self) -> Disk {
        lock(&self.recorder).current().clone()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Detach at once: a killed process's io_uring may hold the pool file for a while
        // after it is reaped; the session thread answers EIO until the kernel lets go.
        if let Ok(c) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: umount2 with a NUL-terminated path that outlives the call.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
        drop(self.session.take());
    }
}

fn lock(r: &Mutex<Recorder>) -> MutexGuard<'_, Recorder> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

struct PowercutFs {
    recorder: Arc<Mutex<Recorder>>,
    /// File names by inode: inode `i + 2` is `inodes[i]` (1 is the root directory).
    inodes: Mutex<Vec<String>>,
}

impl PowercutFs {
    fn name(&self, ino: INodeNo) -> Option<String> {
        let i = u64::from(ino).checked_sub(2)?;
        let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        inodes.get(i as usize).cloned()
    }

    fn ino(&self, name: &OsStr) -> Option<INodeNo> {
        let inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        inodes
            .iter()
            .position(|n| n.as_bytes() == name.as_bytes())
            .map(|i| INodeNo(i as u64 + 2))
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
            return Some(attr(ino, FileType::Directory, 0, 0o755));
        }
        let name = self.name(ino)?;
        let size = lock(&self.recorder).current().size(&name)?;
        Some(attr(ino, FileType::RegularFile, size, 0o600))
    }
}

fn attr(ino: INodeNo, kind: FileType, size: u64, perm: u16) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn eio(_: PoweredOff) -> Errno {
    Errno::EIO
}

impl Filesystem for PowercutFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent == INodeNo::ROOT)
            .then(|| self.ino(name))
            .flatten()
            .and_then(|ino| self.attr(ino))
        {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Modes, owners and times are not kept: only the size matters to a pool file.
        if let (Some(size), Some(name)) = (size, self.name(ino)) {
            if let Err(e) = lock(&self.recorder).set_size(&name, size) {
                return reply.error(eio(e));
            }
        }
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(text) = name.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        let ino = match self.ino(name) {
            Some(_) if flags & libc::O_EXCL != 0 => return reply.error(Errno::EEXIST),
            Some(ino) => ino,
            None => {
                let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
                inodes.push(text.to_string());
                INodeNo(inodes.len() as u64 + 1)
            }
        };
        let mut r = lock(&self.recorder);
        let made = r.create(text).and_then(|()| {
            if flags & libc::O_TRUNC != 0 {
                r.set_size(text, 0)
            } else {
                Ok(())
            }
        });
        drop(r);
        if let Err(e) = made {
            return reply.error(eio(e));
        }
        let a = self.attr(ino).expect("created above");
        reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Direct I/O on every open: no page cache of the kernel's between tessel and the
        // recorder, whatever flags the opener used.
        match self.name(ino) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(name) = self.name(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let mut r = lock(&self.recorder);
        let end = r.current().size(&name).unwrap_or(0);
        let n = end.saturating_sub(offset).min(u64::from(size)) as usize;
        let mut out = vec![0u8; n];
        match r.read(&name, offset, &mut out) {
            Ok(()) => reply.data(&out),
            Err(e) => reply.error(eio(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(name) = self.name(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The kernel puts O_DSYNC here for an RWF_DSYNC write or a file opened O_DSYNC
        // (fuse_write_flags): such a write is durable when answered.
        let dsync = flags.0 & libc::O_DSYNC != 0;
        match lock(&self.recorder).write(&name, offset, data, dsync) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(eio(e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Never ENOSYS: the kernel would stop sending fsyncs and report success itself.
        let Some(name) = self.name(ino) else {
            return reply.error(Errno::ENOENT);
        };
        match lock(&self.recorder).fsync(&name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(eio(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): makes nothing durable.
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let inodes = self
            .inodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let entries = [
            (INodeNo::ROOT, FileType::Directory, ".".to_string()),
            (INodeNo::ROOT, FileType::Directory, "..".to_string()),
        ]
        .into_iter()
        .chain(
            inodes
                .into_iter()
                .enumerate()
                .map(|(i, n)| (INodeNo(i as u64 + 2), FileType::RegularFile, n)),
        );
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(ino, i as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }
}
