//! The FUSE adapter: the only place that talks `fuser` types and calls
//! `reply.*`. Every answer comes from the [`Tree`]; errors become errnos in
//! [`errno`].
//!
//! Read path (why a cached read never reaches this process):
//! - `init` asks for `FUSE_NO_OPEN_SUPPORT` / `FUSE_NO_OPENDIR_SUPPORT` and
//!   `open`/`opendir` answer `ENOSYS`: the kernel then opens every later file
//!   by itself, saving one round trip (~50 µs here) per `open()`.
//! - Entries and attributes live for a day: names only change when the sync
//!   loop invalidates them, and each inode's bytes never change, so the page
//!   cache stays valid until the inode is forgotten.
//! - The status file is the exception: its content changes every second, so
//!   its attributes expire after a second and the sync loop invalidates its
//!   pages whenever it rewrites it.

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};

use crate::guard::Guard;
use crate::tree::{lock, Attr, FsError, Kind, SharedTree, ROOT_INO, STATUS_INO};

/// Names and attributes change only through explicit invalidation.
pub const LONG_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// The status file's size changes every second.
pub const STATUS_ATTR_TTL: Duration = Duration::from_secs(1);

pub struct SecretFs {
    tree: SharedTree,
    /// The caller check, when `--container`/`--allow-cgroup` is given.
    guard: Option<Arc<Guard>>,
    /// The kernel accepted FUSE_NO_OPEN_SUPPORT: `open` may answer ENOSYS.
    no_open: bool,
    no_opendir: bool,
}

impl SecretFs {
    pub fn new(tree: SharedTree) -> SecretFs {
        SecretFs {
            tree,
            guard: None,
            no_open: false,
            no_opendir: false,
        }
    }

    /// With a caller check: every lookup, open and listing asks us.
    pub fn with_guard(tree: SharedTree, guard: Option<Arc<Guard>>) -> SecretFs {
        SecretFs {
            guard,
            ..SecretFs::new(tree)
        }
    }

    /// Whether the caller of `req` may touch `ino`.
    fn admit(&self, req: &Request, ino: u64, what: &str) -> bool {
        match &self.guard {
            None => true,
            Some(g) => g.admit(ino, req.pid(), req.uid(), || format!("{what} inode {ino}")),
        }
    }

    /// Entry and attribute lifetimes: long, unless the caller check needs
    /// the kernel to ask us every time.
    fn ttls(&self, ino: u64) -> (Duration, Duration) {
        if self.guard.is_some() && ino != STATUS_INO {
            (Duration::ZERO, Duration::ZERO)
        } else {
            (attr_ttl(ino), LONG_TTL)
        }
    }
}

/// The single FsError -> errno mapping.
fn errno(e: FsError) -> Errno {
    match e {
        FsError::NotFound => Errno::ENOENT,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::Stale => Errno::ESTALE,
        // What a disk that stopped answering gives: readers fail, loudly.
        FsError::Unavailable => Errno::EIO,
        // A descriptor opened before the secret left: it fails like one
        // whose disk went away, never with the old bytes.
        FsError::Revoked => Errno::EIO,
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

fn attr_ttl(ino: u64) -> Duration {
    if ino == STATUS_INO {
        STATUS_ATTR_TTL
    } else {
        LONG_TTL
    }
}

impl SecretFs {
    /// Listing a folder names secrets: checked, the root's listing too (the
    /// root is exempt only for the attributes the kernel needs to enter it).
    fn admit_listing(&self, req: &Request, ino: u64) -> bool {
        match &self.guard {
            None => true,
            Some(g) if ino == ROOT_INO => {
                g.admit(u64::MAX, req.pid(), req.uid(), || "readdir /".into())
            }
            Some(_) => self.admit(req, ino, "readdir"),
        }
    }
}

/// Asks for one capability; an old kernel simply goes without it.
fn want(config: &mut KernelConfig, flag: InitFlags, name: &str) -> bool {
    match config.add_capabilities(flag) {
        Ok(()) => true,
        Err(_) => {
            tracing::info!(
                capability = name,
                "kernel lacks FUSE capability; continuing without it"
            );
            false
        }
    }
}

impl Filesystem for SecretFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The caller check must see every open: no no-open then.
        if self.guard.is_none() {
            self.no_open = want(config, InitFlags::FUSE_NO_OPEN_SUPPORT, "NO_OPEN_SUPPORT");
            self.no_opendir = want(
                config,
                InitFlags::FUSE_NO_OPENDIR_SUPPORT,
                "NO_OPENDIR_SUPPORT",
            );
        }
        // `ls -l` of a directory in one round trip instead of one lookup per
        // entry; the tree counts the lookups readdirplus implies.
        want(config, InitFlags::FUSE_DO_READDIRPLUS, "DO_READDIRPLUS");
        want(config, InitFlags::FUSE_READDIRPLUS_AUTO, "READDIRPLUS_AUTO");
        // Lookups in one directory need not wait for each other.
        want(config, InitFlags::FUSE_PARALLEL_DIROPS, "PARALLEL_DIROPS");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(g) = &self.guard {
            if !g.admit_lookup(parent.0, &name.to_string_lossy(), req.pid(), req.uid()) {
                return reply.error(Errno::EACCES);
            }
        }
        match lock(&self.tree).lookup(parent.0, name) {
            Ok(a) => {
                let (attr_ttl, entry_ttl) = self.ttls(a.ino);
                reply.entry_with_ttls(&attr_ttl, &entry_ttl, &file_attr(&a), Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        lock(&self.tree).forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if !self.admit(req, ino.0, "getattr") {
            return reply.error(Errno::EACCES);
        }
        match lock(&self.tree).getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttls(a.ino).0, &file_attr(&a)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if !self.admit(req, ino.0, "open") {
            reply.error(Errno::EACCES);
        } else if self.no_open {
            // The kernel takes ENOSYS as "open needs no daemon" from now on.
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != ROOT_INO && !self.admit(req, ino.0, "opendir") {
            reply.error(Errno::EACCES);
        } else if self.no_opendir {
            reply.error(Errno::ENOSYS);
        } else {
            reply.opened(FileHandle(0), FopenFlags::empty());
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
        // Clone the Arc under the lock, copy into the reply without it.
        let out = lock(&self.tree).read(ino.0, offset, size);
        match out {
            Ok(out) => reply.data(out.bytes()),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if !self.admit_listing(req, ino.0) {
            return reply.error(Errno::EACCES);
        }
        let res = lock(&self.tree).readdir(ino.0, offset, false, |e| {
            reply.add(
                INodeNo(e.attr.ino),
                e.offset,
                file_type(e.attr.kind),
                &e.name,
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        if !self.admit_listing(req, ino.0) {
            return reply.error(Errno::EACCES);
        }
        // The reply must be built under the lock: the lookups it implies
        // are counted there, and a forget must not slip in between.
        let res = lock(&self.tree).readdir(ino.0, offset, true, |e| {
            reply.add(
                INodeNo(e.attr.ino),
                e.offset,
                &e.name,
                &self.ttls(e.attr.ino).0,
                &file_attr(&e.attr),
                Generation(0),
            )
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = lock(&self.tree).inode_count() as u64;
        reply.statfs(0, 0, 0, files, 0, 4096, 255, 4096);
    }

    // Nothing that would change the tree is implemented: the mount is
    // `ro`, so the kernel answers EROFS to writes, creates, renames,
    // setattr and xattr changes before they reach us (tested in
    // tests/fuse_mount.rs); were it ever remounted writable, fuser's
    // defaults answer ENOSYS.

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only reached without default_permissions; the kernel checks modes.
        reply.ok();
    }
}
