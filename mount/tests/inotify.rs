//! What applications watching the mount with inotify are told: measured on
//! a real FUSE mount (root and /dev/fuse; fails, never skips, without them).
//!
//! Finding on Linux 6.18: nothing. inotify events come from the VFS for
//! changes made through it; FUSE notifications are not such changes. Even
//! `FUSE_NOTIFY_DELETE` (fuser `Notifier::delete`), which takes the kernel
//! through `d_delete` and `clear_nlink` (an open handle's `fstat` shows
//! nlink 0 afterwards), raises no IN_DELETE on the directory and no
//! IN_ATTRIB/IN_DELETE_SELF on the file: the kernel calls `d_delete`, not
//! `d_delete_notify`. Entry and inode invalidations raise nothing either.
//! This test prints what arrives and fails if that ever changes, so the
//! documentation (docs/mount-live.md) gets updated with the kernel.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use secretfs_mount::{StaticMount, StaticSecret};

mod common;
use common::bounded;

struct Inotify {
    fd: i32,
}

impl Inotify {
    fn new() -> Inotify {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1: {}",
            std::io::Error::last_os_error()
        );
        Inotify { fd }
    }

    fn watch(&self, path: &Path) -> i32 {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: valid C string.
        let wd = unsafe { libc::inotify_add_watch(self.fd, c.as_ptr(), libc::IN_ALL_EVENTS) };
        assert!(
            wd >= 0,
            "inotify_add_watch: {}",
            std::io::Error::last_os_error()
        );
        wd
    }

    /// Every event that arrives within `wait`, as (watch, mask, name).
    fn events(&self, wait: Duration) -> Vec<(i32, u32, String)> {
        let mut out = Vec::new();
        let end = Instant::now() + wait;
        let mut buf = [0u8; 4096];
        while Instant::now() < end {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let mut off = 0usize;
            while off < n as usize {
                // SAFETY: the kernel wrote whole inotify_event records.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
                let start = off + std::mem::size_of::<libc::inotify_event>();
                let raw = &buf[start..start + ev.len as usize];
                let name = String::from_utf8_lossy(raw)
                    .trim_end_matches('\0')
                    .to_owned();
                out.push((ev.wd, ev.mask, name));
                off = start + ev.len as usize;
            }
        }
        out
    }
}

impl Drop for Inotify {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
    }
}

fn has(events: &[(i32, u32, String)], wd: i32, mask: u32, name: &str) -> bool {
    events
        .iter()
        .any(|(w, m, n)| *w == wd && m & mask != 0 && n == name)
}

#[test]
fn inotify_watchers_hear_nothing_from_fuse_notifications_on_this_kernel() {
    bounded(Duration::from_secs(60), || {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut m = StaticMount::mount(
            &dir,
            0,
            0,
            0o400,
            vec![
                StaticSecret::new(1, 1, "db/pw", b"v1"),
                StaticSecret::new(2, 1, "top", b"t1"),
            ],
        )
        .unwrap_or_else(|e| panic!("this test needs FUSE (root, /dev/fuse): {e}"));

        // An application that read the file, holds it open, and watches.
        assert_eq!(fs::read(dir.join("db/pw")).unwrap(), b"v1");
        assert_eq!(fs::read(dir.join("top")).unwrap(), b"t1");
        let mut open = fs::File::open(dir.join("db/pw")).unwrap();
        let mut top = fs::File::open(dir.join("top")).unwrap();
        let ino = Inotify::new();
        let wd_db = ino.watch(&dir.join("db"));
        let wd_file = ino.watch(&dir.join("db/pw"));
        let wd_root = ino.watch(&dir);

        // Rotation.
        m.update(vec![
            StaticSecret::new(1, 2, "db/pw", b"v2-longer"),
            StaticSecret::new(2, 1, "top", b"t1"),
        ]);
        let ev = ino.events(Duration::from_millis(300));
        eprintln!("rotation: {ev:?}");

        assert!(
            ev.is_empty(),
            "the kernel now tells inotify of a rotation: update docs/mount-live.md: {ev:?}"
        );
        let _ = (wd_db, wd_file);
        assert_eq!(fs::read(dir.join("db/pw")).unwrap(), b"v2-longer");
        let mut old = Vec::new();
        open.read_to_end(&mut old).unwrap();
        assert_eq!(old, b"v1", "an open file keeps the version it opened");

        // Addition: FUSE has no "entry created" notification.
        m.update(vec![
            StaticSecret::new(1, 2, "db/pw", b"v2-longer"),
            StaticSecret::new(2, 1, "top", b"t1"),
            StaticSecret::new(3, 1, "new", b"n"),
        ]);
        let ev = ino.events(Duration::from_millis(300));
        eprintln!("addition: {ev:?}");
        assert!(
            !ev.iter().any(|(w, _, n)| *w == wd_root && n == "new"),
            "documented: additions raise nothing: {ev:?}"
        );
        assert_eq!(fs::read(dir.join("new")).unwrap(), b"n");

        // Removal.
        m.update(vec![
            StaticSecret::new(1, 2, "db/pw", b"v2-longer"),
            StaticSecret::new(3, 1, "new", b"n"),
        ]);
        let ev = ino.events(Duration::from_millis(300));
        eprintln!("removal: {ev:?}");
        assert!(
            !has(&ev, wd_root, libc::IN_DELETE, "top"),
            "the kernel now tells inotify of a deletion: update docs/mount-live.md: {ev:?}"
        );
        assert!(!dir.join("top").exists());
        {
            // The kernel did take the delete (the inode is unlinked, and an
            // open handle no longer reads the removed secret): only the
            // inotify event is missing.
            use std::os::unix::fs::MetadataExt;
            assert_eq!(top.metadata().unwrap().nlink(), 0);
            let mut b = Vec::new();
            match top.read_to_end(&mut b) {
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
                Ok(_) => assert!(b.is_empty(), "a removed secret still read: {b:?}"),
            }
        }

        drop(open);
        drop(top);
        drop(ino);
        m.unmount(Duration::from_secs(2));
    });
}
