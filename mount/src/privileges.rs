//! Least privilege for the mount process: keep only the capabilities the
//! mount needs, drop every other one (effective, permitted, inheritable,
//! ambient and, when we may, the bounding set) and set no_new_privs.
//!
//! What the mount needs (measured on Linux 6.18, see docs/containers.md):
//! - `CAP_SYS_ADMIN`: mount(2), and `umount2` of its own mount at shutdown.
//! - `CAP_IPC_LOCK`: `mlock` of secrets beyond `RLIMIT_MEMLOCK` (8 MiB by
//!   default).
//! - Nothing for the caller check: `/proc/PID/cgroup` is mode 0444 and
//!   readable for every process, other users' and non-dumpable ones
//!   included. (`CAP_SYS_PTRACE` would only matter for
//!   `/proc/PID/ns/*`, which we do not read, or a `/proc` mounted with
//!   `hidepid=`; use its `gid=` option instead.)
//! - Nothing for serving FUSE or the server connection.
//!
//! Capabilities and no_new_privs belong to each thread, and a new thread
//! copies its creator's. So [`drop_privileges`] runs while the process has
//! one thread (`secretfs mount` calls it before it builds its async
//! runtime) and refuses otherwise; every later thread inherits the dropped
//! sets. Right before mounting, [`verify_every_thread`] reads each
//! thread's `/proc/self/task/TID/status`, and the mount does not start if
//! one holds anything else.

use caps::{CapSet, CapsHashSet};
use procfs::process::Process;
use procfs::ProcError;

pub use caps::Capability;

/// What the mount keeps (see the module comment).
pub const MOUNT_KEEPS: &[Capability] = &[Capability::CAP_SYS_ADMIN, Capability::CAP_IPC_LOCK];

/// What [`drop_privileges`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedReport {
    /// Asked for and held: still permitted and effective.
    pub kept: Vec<Capability>,
    /// Asked for but not held to begin with (the service manager did not
    /// grant them); the mount carries on without.
    pub not_held: Vec<Capability>,
    /// Held before, gone now.
    pub dropped: Vec<Capability>,
    /// Whether the bounding set was cut to `kept` too (needs CAP_SETPCAP;
    /// without it no_new_privs alone stops an exec from regaining anything).
    pub bounding_set_dropped: bool,
}

impl std::fmt::Display for DroppedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kept {}; dropped {} capabilities; no_new_privs set{}",
            names(&self.kept),
            self.dropped.len(),
            if self.bounding_set_dropped {
                ""
            } else {
                " (bounding set left as the service manager set it)"
            }
        )?;
        if !self.not_held.is_empty() {
            write!(f, "; not held to begin with: {}", names(&self.not_held))?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PrivilegeError {
    #[error("cannot read this process's capabilities or threads ({0}): /proc must be mounted and readable")]
    Read(String),
    #[error(
        "capabilities must be dropped while the process has one thread, but it has {0}: \
         drop them first thing in main, before any runtime or thread starts"
    )]
    Threads(usize),
    #[error(
        "cannot drop capabilities ({0}): allow capset(2) and prctl(2) to the mount's process \
         (a seccomp profile or security module forbids them)"
    )]
    Drop(String),
    #[error(
        "thread {tid} holds {what}, not just {kept}: a thread kept privileges it should \
         have dropped; refusing to serve"
    )]
    Differs {
        tid: i32,
        what: String,
        kept: String,
    },
}

/// Keeps `keep` (those of them held now), drops every other capability
/// and sets no_new_privs. Call it while the process has one thread.
pub fn drop_privileges(keep: &[Capability]) -> Result<DroppedReport, PrivilegeError> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(PrivilegeError::Threads(threads));
    }
    let read = |set| caps::read(None, set).map_err(|e| PrivilegeError::Read(e.to_string()));
    let failed = |e: caps::errors::CapsError| PrivilegeError::Drop(e.to_string());
    let held = read(CapSet::Permitted)?;
    let want: CapsHashSet = keep.iter().copied().collect();
    let kept: CapsHashSet = held.intersection(&want).copied().collect();
    let bounding = read(CapSet::Effective)?.contains(&Capability::CAP_SETPCAP);
    if bounding {
        for cap in read(CapSet::Bounding)?.difference(&kept) {
            caps::drop(None, CapSet::Bounding, *cap).map_err(failed)?;
        }
    }
    // Kernels before 4.3 have no ambient set: nothing to clear.
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(failed)?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(failed)?;
    // Effective first: it must stay within the permitted set.
    caps::set(None, CapSet::Effective, &kept).map_err(failed)?;
    caps::set(None, CapSet::Permitted, &kept).map_err(failed)?;
    rustix::thread::set_no_new_privs(true).map_err(|e| PrivilegeError::Drop(e.to_string()))?;

    let report = DroppedReport {
        kept: sorted(kept.iter()),
        not_held: sorted(want.difference(&held)),
        dropped: sorted(held.difference(&kept)),
        bounding_set_dropped: bounding,
    };
    verify_every_thread(&report)?;
    Ok(report)
}

/// Checks that every thread of this process holds exactly what `report`
/// kept (no more in its bounding set when that was cut), nothing
/// inheritable or ambient, and no_new_privs. Returns how many threads
/// were checked.
pub fn verify_every_thread(report: &DroppedReport) -> Result<usize, PrivilegeError> {
    let kept = mask(&report.kept);
    let me = Process::myself().map_err(read_failed)?;
    let mut checked = 0;
    for tid in thread_ids()? {
        // A thread that ended meanwhile has nothing left to check; one we
        // cannot read might hold anything.
        let s = match me.task_from_tid(tid).and_then(|t| t.status()) {
            Ok(s) => s,
            Err(e) if ended(&e) => continue,
            Err(e) => return Err(read_failed(e)),
        };
        let differs = |what: String| PrivilegeError::Differs {
            tid,
            what,
            kept: names(&report.kept),
        };
        if s.capeff != kept || s.capprm != kept {
            return Err(differs(format!(
                "permitted {:#x}, effective {:#x}",
                s.capprm, s.capeff
            )));
        }
        if s.capinh != 0 || s.capamb.unwrap_or(0) != 0 {
            return Err(differs("inheritable or ambient capabilities".into()));
        }
        if report.bounding_set_dropped && s.capbnd.unwrap_or(u64::MAX) & !kept != 0 {
            return Err(differs(format!(
                "bounding set {:#x}",
                s.capbnd.unwrap_or(u64::MAX)
            )));
        }
        if s.nonewprivs != Some(1) {
            return Err(differs("no no_new_privs".into()));
        }
        checked += 1;
    }
    Ok(checked)
}

/// This process's threads, from `/proc/self/task`. Read by hand: procfs's
/// iterator leaves out a thread whose directory it cannot open, whatever
/// the reason.
fn thread_ids() -> Result<Vec<i32>, PrivilegeError> {
    let failed = |e: std::io::Error| PrivilegeError::Read(format!("/proc/self/task: {e}"));
    let mut tids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(failed)? {
        let name = entry.map_err(failed)?.file_name();
        let tid = name.to_str().and_then(|n| n.parse().ok()).ok_or_else(|| {
            PrivilegeError::Read(format!("/proc/self/task/{name:?}: not a thread id"))
        })?;
        tids.push(tid);
    }
    Ok(tids)
}

/// The thread ended: its `/proc` entry is gone (ENOENT) or outlived it
/// (ESRCH; procfs reports both as `NotFound`).
fn ended(e: &ProcError) -> bool {
    match e {
        ProcError::NotFound(_) => true,
        ProcError::Io(io, _) => {
            io.kind() == std::io::ErrorKind::NotFound || io.raw_os_error() == Some(libc::ESRCH)
        }
        _ => false,
    }
}

fn read_failed(e: ProcError) -> PrivilegeError {
    PrivilegeError::Read(e.to_string())
}

fn thread_count() -> Result<usize, PrivilegeError> {
    thread_ids().map(|tids| tids.len())
}

fn sorted<'a>(caps: impl Iterator<Item = &'a Capability>) -> Vec<Capability> {
    let mut v: Vec<Capability> = caps.copied().collect();
    v.sort_by_key(|c| c.index());
    v
}

fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

fn names(caps: &[Capability]) -> String {
    if caps.is_empty() {
        "none".to_owned()
    } else {
        caps.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    use procfs::process::Status;

    /// Runs `f` in a forked child, which has one thread and leaves this
    /// test process its own privileges; returns the child's verdict.
    /// Bounded to 30 s.
    fn in_child(f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
        assert!(
            rustix::process::geteuid().is_root(),
            "the privilege tests need root (they drop capabilities in a child)"
        );
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only runs `f` and leaves with _exit, never
        // returning into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // SAFETY: the read end is ours to close in the child.
            unsafe { libc::close(fds[0]) };
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err("the child panicked".into()));
            let text = match verdict {
                Ok(s) => format!("ok:{s}"),
                Err(e) => format!("err:{e}"),
            };
            // SAFETY: `text` is valid for its length; _exit ends the child
            // without running the parent's destructors or atexit handlers.
            unsafe {
                libc::write(fds[1], text.as_ptr().cast(), text.len());
                libc::_exit(0);
            }
        }
        // SAFETY: the write end belongs to the child now.
        unsafe { libc::close(fds[1]) };
        let mut pfd = libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // Wait for the child's answer (EOF comes when it exits).
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        if ready <= 0 {
            // SAFETY: our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut text = String::new();
        // SAFETY: the read end is open and owned by nothing else.
        let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let _ = pipe.read_to_string(&mut text);
        let mut status = 0;
        // SAFETY: reaps our own child into a local.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        match text.split_once(':') {
            Some(("ok", s)) => Ok(s.to_owned()),
            Some(("err", e)) => Err(e.to_owned()),
            _ => Err(format!(
                "the child gave no answer (status {status}, timed out: {})",
                ready <= 0
            )),
        }
    }

    macro_rules! ensure {
        ($cond:expr, $($fmt:tt)*) => {
            if !$cond {
                return Err(format!($($fmt)*));
            }
        };
    }

    fn this_thread() -> Status {
        Process::myself()
            .unwrap()
            .task_from_tid(rustix::thread::gettid().as_raw_nonzero().get())
            .unwrap()
            .status()
            .unwrap()
    }

    fn all_threads() -> Vec<Status> {
        Process::myself()
            .unwrap()
            .tasks()
            .unwrap()
            .flatten()
            .filter_map(|t| t.status().ok())
            .collect()
    }

    /// The sets `/proc` shows, comparable across calls.
    fn sets(s: &Status) -> (u64, u64, u64, Option<u64>, Option<u64>, Option<u64>) {
        (
            s.capinh,
            s.capprm,
            s.capeff,
            s.capbnd,
            s.capamb,
            s.nonewprivs,
        )
    }

    /// A fresh directory name for a tmpfs, chosen in the parent.
    fn scratch(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("secretfs-priv-{tag}-{}", std::process::id()))
    }

    /// Mounts a tmpfs at `dir` (needs CAP_SYS_ADMIN).
    fn tmpfs(dir: &std::path::Path) {
        std::fs::create_dir_all(dir).unwrap();
        rustix::mount::mount(
            "none",
            dir,
            "tmpfs",
            rustix::mount::MountFlags::empty(),
            None,
        )
        .unwrap();
    }

    fn umount(dir: &std::path::Path) -> rustix::io::Result<()> {
        rustix::mount::unmount(dir, rustix::mount::UnmountFlags::DETACH)
    }

    const KEPT: u64 = (1 << 21) | (1 << 14);

    #[test]
    fn every_thread_keeps_only_what_the_mount_needs() {
        let before = sets(&this_thread());
        let mnt = scratch("keep");
        let out = in_child(|| {
            tmpfs(&mnt);
            let report = drop_privileges(MOUNT_KEEPS).map_err(|e| e.to_string())?;
            // Threads started afterwards, busy and asleep, as the runtime's.
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let workers: Vec<_> = (0..3)
                .map(|i| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            if i == 0 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    })
                })
                .collect();
            let checked = verify_every_thread(&report).map_err(|e| e.to_string())?;
            ensure!(checked == 4, "checked {checked} threads");
            let threads = all_threads();
            ensure!(threads.len() == 4, "saw {} threads", threads.len());
            for s in &threads {
                ensure!(s.capeff == KEPT && s.capprm == KEPT, "{:?}", sets(s));
                ensure!(s.capbnd == Some(KEPT), "bounding set: {:?}", s.capbnd);
                ensure!(s.capinh == 0 && s.capamb == Some(0), "{:?}", sets(s));
                ensure!(s.nonewprivs == Some(1), "no_new_privs missing");
            }
            ensure!(
                report.kept == vec![Capability::CAP_IPC_LOCK, Capability::CAP_SYS_ADMIN],
                "{report:?}"
            );
            ensure!(
                report.dropped.contains(&Capability::CAP_CHOWN),
                "{report:?}"
            );
            ensure!(report.bounding_set_dropped, "{report:?}");
            // What was kept works: unmount (CAP_SYS_ADMIN), mlock beyond
            // the 8 MiB limit (CAP_IPC_LOCK).
            umount(&mnt).map_err(|e| format!("umount with CAP_SYS_ADMIN kept: {e}"))?;
            let big = vec![1u8; 16 << 20];
            // SAFETY: `big` is a live allocation of that length.
            let locked = unsafe { rustix::mm::mlock(big.as_ptr() as *mut _, big.len()) };
            ensure!(locked.is_ok(), "mlock 16 MiB with CAP_IPC_LOCK: {locked:?}");
            // What was dropped is gone: chown to another user.
            let f = std::env::temp_dir().join(format!("secretfs-priv-f-{}", std::process::id()));
            std::fs::write(&f, b"x").map_err(|e| e.to_string())?;
            let chown = std::os::unix::fs::chown(&f, Some(12345), None);
            let _ = std::fs::remove_file(&f);
            ensure!(chown.is_err(), "chown worked without CAP_CHOWN");
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for w in workers {
                let _ = w.join();
            }
            Ok(report.to_string())
        })
        .unwrap();
        let _ = std::fs::remove_dir(&mnt);
        assert!(
            out.starts_with("kept CAP_IPC_LOCK,CAP_SYS_ADMIN; dropped"),
            "{out}"
        );
        // The test process itself still holds what it held.
        assert_eq!(sets(&this_thread()), before);
    }

    #[test]
    fn dropping_refuses_once_other_threads_exist() {
        let out = in_child(|| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _ = rx.recv();
            });
            let err = drop_privileges(MOUNT_KEEPS).err();
            drop(tx);
            let _ = t.join();
            let text = err.map(|e| e.to_string()).unwrap_or_default();
            ensure!(text.contains("has 2") && text.contains("main"), "{text}");
            let s = this_thread();
            ensure!(s.capbnd != Some(KEPT), "dropped anyway: {:?}", sets(&s));
            Ok(String::new())
        });
        out.unwrap();
    }

    #[test]
    fn a_thread_that_differs_is_caught() {
        let out = in_child(|| {
            let keep = [
                Capability::CAP_SYS_ADMIN,
                Capability::CAP_IPC_LOCK,
                Capability::CAP_CHOWN,
            ];
            let report = drop_privileges(&keep).map_err(|e| e.to_string())?;
            // A thread that changes its own sets: the check must see it.
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
            let t = std::thread::spawn(move || {
                let _ = caps::drop(None, CapSet::Effective, Capability::CAP_CHOWN);
                let _ = ready_tx.send(());
                let _ = rx.recv();
            });
            let _ = ready_rx.recv();
            let verdict = verify_every_thread(&report);
            drop(tx);
            let _ = t.join();
            let text = verdict.err().map(|e| e.to_string()).unwrap_or_default();
            ensure!(
                text.contains("effective") && text.contains("refusing to serve"),
                "{text}"
            );
            Ok(String::new())
        });
        out.unwrap();
    }

    #[test]
    fn the_caller_check_needs_no_capability() {
        let mnt = scratch("none");
        let out = in_child(|| {
            tmpfs(&mnt);
            // Another user's non-dumpable process: a child that drops to
            // nobody and waits.
            let mut fds = [0; 2];
            // SAFETY: `fds` has room for two descriptors.
            unsafe { libc::pipe(fds.as_mut_ptr()) };
            // SAFETY: the grandchild makes raw syscalls only and _exits.
            let target = unsafe { libc::fork() };
            if target == 0 {
                // SAFETY: plain syscalls on values we own; ends in _exit.
                unsafe {
                    libc::setgid(65534);
                    libc::setuid(65534);
                    libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                    libc::close(fds[1]);
                    let mut b = 0u8;
                    libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                    libc::_exit(0);
                }
            }
            // SAFETY: the read end is the grandchild's now.
            unsafe { libc::close(fds[0]) };
            std::thread::sleep(Duration::from_millis(100));
            let report = drop_privileges(&[]).map_err(|e| e.to_string())?;
            let s = this_thread();
            ensure!(
                s.capeff == 0 && s.capprm == 0 && s.capbnd == Some(0),
                "{:?}",
                sets(&s)
            );
            let cgroup = std::fs::read_to_string(format!("/proc/{target}/cgroup"));
            let stat = std::fs::read_to_string(format!("/proc/{target}/stat"));
            let status = std::fs::read_to_string(format!("/proc/{target}/status"));
            // Without CAP_SYS_ADMIN our own mount can no longer be removed.
            let umount_err = umount(&mnt).err();
            // SAFETY: closes our write end and reaps our own child.
            unsafe {
                libc::close(fds[1]);
                libc::waitpid(target, std::ptr::null_mut(), 0);
            }
            ensure!(cgroup.is_ok(), "read another user's cgroup: {cgroup:?}");
            ensure!(stat.is_ok_and(|s| s.contains(')')), "read its stat");
            ensure!(
                status.is_ok_and(|s| s.contains("Uid:\t65534")),
                "read its status"
            );
            ensure!(
                umount_err == Some(rustix::io::Errno::PERM),
                "umount without CAP_SYS_ADMIN: {umount_err:?}"
            );
            ensure!(
                report.kept.is_empty() && report.dropped.contains(&Capability::CAP_SYS_ADMIN),
                "{report:?}"
            );
            Ok(String::new())
        });
        // The tmpfs is left mounted by the child (it could not remove it).
        let _ = umount(&mnt);
        let _ = std::fs::remove_dir(&mnt);
        out.unwrap();
    }

    #[test]
    fn capabilities_not_held_are_reported_not_invented() {
        let out = in_child(|| {
            // First give up CAP_IPC_LOCK, then ask to keep it.
            drop_privileges(&[Capability::CAP_SYS_ADMIN, Capability::CAP_SETPCAP])
                .map_err(|e| e.to_string())?;
            let report = drop_privileges(MOUNT_KEEPS).map_err(|e| e.to_string())?;
            ensure!(report.kept == vec![Capability::CAP_SYS_ADMIN], "{report:?}");
            ensure!(
                report.not_held == vec![Capability::CAP_IPC_LOCK],
                "{report:?}"
            );
            ensure!(
                report.dropped == vec![Capability::CAP_SETPCAP],
                "{report:?}"
            );
            let s = this_thread();
            ensure!(
                s.capeff == Capability::CAP_SYS_ADMIN.bitmask(),
                "{:?}",
                sets(&s)
            );
            Ok(report.to_string())
        })
        .unwrap();
        assert!(
            out.contains("not held to begin with: CAP_IPC_LOCK"),
            "{out}"
        );
    }

    #[test]
    fn only_a_thread_that_ended_is_skipped() {
        let io = |errno| ProcError::Io(std::io::Error::from_raw_os_error(errno), None);
        assert!(ended(&ProcError::NotFound(None)));
        assert!(ended(&io(libc::ESRCH)));
        assert!(ended(&io(libc::ENOENT)));
        for unreadable in [
            ProcError::PermissionDenied(None),
            ProcError::Incomplete(None),
            io(libc::EIO),
            io(libc::EACCES),
        ] {
            assert!(!ended(&unreadable), "{unreadable:?}");
        }
        // And the check reads every thread there is.
        let tids = thread_ids().unwrap();
        assert!(tids.contains(&rustix::thread::gettid().as_raw_nonzero().get()));
    }

    #[test]
    fn every_capability_the_kernel_knows_is_known_here() {
        // Otherwise one could stay in the bounding set unseen.
        let last: u8 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let known = caps::all().iter().map(|c| c.index()).max().unwrap();
        assert!(last <= known, "kernel knows capability {last}");
        assert_eq!(Capability::CAP_SYS_ADMIN.bitmask(), 1 << 21);
        assert_eq!(mask(MOUNT_KEEPS), KEPT);
    }
}
