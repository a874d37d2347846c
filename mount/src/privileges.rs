//! Least privilege after mounting: keep only the capabilities the mount still
//! needs, drop every other one (effective, permitted, inheritable, ambient
//! and, when we may, the bounding set) and set no_new_privs.
//!
//! What the mount needs once the FUSE session is up (measured on Linux 6.18,
//! see docs/containers.md):
//! - `CAP_SYS_ADMIN`: `umount2` of its own mount at shutdown.
//! - `CAP_IPC_LOCK`: `mlock` of secrets that arrive later, beyond
//!   `RLIMIT_MEMLOCK` (8 MiB by default).
//! - Nothing for the caller check: `/proc/PID/cgroup` and `/proc/PID/stat`
//!   are mode 0444 and readable for every process, other users' and
//!   non-dumpable ones included. (`CAP_SYS_PTRACE` would only matter for
//!   `/proc/PID/ns/*`, which we do not read, or a `/proc` mounted with
//!   `hidepid=`; use its `gid=` option instead.)
//! - Nothing for serving FUSE or the server connection: the `/dev/fuse`
//!   descriptor is already open and the certificate and key were read at
//!   start.
//!
//! Capabilities and no_new_privs belong to each thread, not the process, and
//! the mount has tokio's and fuser's threads by the time it drops. Like
//! glibc's `setuid` (and libpsx), [`drop_privileges`] makes every thread do
//! it: a signal to each thread whose handler makes the same raw syscalls,
//! then a check of every thread's `/proc/self/task/TID/status`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

macro_rules! caps {
    ($($variant:ident = $num:literal, $name:literal;)*) => {
        /// A Linux capability.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u8)]
        pub enum Cap {
            $($variant = $num,)*
        }

        impl Cap {
            /// Every capability this code knows, in number order.
            pub const ALL: &'static [Cap] = &[$(Cap::$variant,)*];

            /// The kernel's name, `CAP_SYS_ADMIN`.
            pub fn name(self) -> &'static str {
                match self {
                    $(Cap::$variant => $name,)*
                }
            }
        }
    };
}

caps! {
    Chown = 0, "CAP_CHOWN";
    DacOverride = 1, "CAP_DAC_OVERRIDE";
    DacReadSearch = 2, "CAP_DAC_READ_SEARCH";
    Fowner = 3, "CAP_FOWNER";
    Fsetid = 4, "CAP_FSETID";
    Kill = 5, "CAP_KILL";
    Setgid = 6, "CAP_SETGID";
    Setuid = 7, "CAP_SETUID";
    Setpcap = 8, "CAP_SETPCAP";
    LinuxImmutable = 9, "CAP_LINUX_IMMUTABLE";
    NetBindService = 10, "CAP_NET_BIND_SERVICE";
    NetBroadcast = 11, "CAP_NET_BROADCAST";
    NetAdmin = 12, "CAP_NET_ADMIN";
    NetRaw = 13, "CAP_NET_RAW";
    IpcLock = 14, "CAP_IPC_LOCK";
    IpcOwner = 15, "CAP_IPC_OWNER";
    SysModule = 16, "CAP_SYS_MODULE";
    SysRawio = 17, "CAP_SYS_RAWIO";
    SysChroot = 18, "CAP_SYS_CHROOT";
    SysPtrace = 19, "CAP_SYS_PTRACE";
    SysPacct = 20, "CAP_SYS_PACCT";
    SysAdmin = 21, "CAP_SYS_ADMIN";
    SysBoot = 22, "CAP_SYS_BOOT";
    SysNice = 23, "CAP_SYS_NICE";
    SysResource = 24, "CAP_SYS_RESOURCE";
    SysTime = 25, "CAP_SYS_TIME";
    SysTtyConfig = 26, "CAP_SYS_TTY_CONFIG";
    Mknod = 27, "CAP_MKNOD";
    Lease = 28, "CAP_LEASE";
    AuditWrite = 29, "CAP_AUDIT_WRITE";
    AuditControl = 30, "CAP_AUDIT_CONTROL";
    Setfcap = 31, "CAP_SETFCAP";
    MacOverride = 32, "CAP_MAC_OVERRIDE";
    MacAdmin = 33, "CAP_MAC_ADMIN";
    Syslog = 34, "CAP_SYSLOG";
    WakeAlarm = 35, "CAP_WAKE_ALARM";
    BlockSuspend = 36, "CAP_BLOCK_SUSPEND";
    AuditRead = 37, "CAP_AUDIT_READ";
    Perfmon = 38, "CAP_PERFMON";
    Bpf = 39, "CAP_BPF";
    CheckpointRestore = 40, "CAP_CHECKPOINT_RESTORE";
}

impl Cap {
    fn bit(self) -> u64 {
        1 << (self as u8)
    }
}

/// What the mount keeps after mounting (see the module comment).
pub const MOUNT_KEEPS: &[Cap] = &[Cap::SysAdmin, Cap::IpcLock];

/// What [`drop_privileges`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedReport {
    /// Asked for and held: still permitted and effective.
    pub kept: Vec<Cap>,
    /// Asked for but not held to begin with (the service manager did not
    /// grant them); the mount carries on without.
    pub not_held: Vec<Cap>,
    /// Held before, gone now.
    pub dropped: Vec<Cap>,
    /// Whether the bounding set was cut to `kept` too (needs CAP_SETPCAP;
    /// without it no_new_privs alone stops an exec from regaining anything).
    pub bounding_set_dropped: bool,
    /// How many threads were changed (all of the process's).
    pub threads: usize,
}

impl std::fmt::Display for DroppedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |caps: &[Cap]| {
            if caps.is_empty() {
                "none".to_owned()
            } else {
                caps.iter().map(|c| c.name()).collect::<Vec<_>>().join(",")
            }
        };
        write!(
            f,
            "kept {}; dropped {} capabilities; no_new_privs set on {} threads{}",
            names(&self.kept),
            self.dropped.len(),
            self.threads,
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
    #[error("cannot read this process's capabilities: {0}")]
    Read(std::io::Error),
    #[error("cannot drop capabilities in thread {tid}: {error}")]
    Drop { tid: i32, error: std::io::Error },
    #[error("thread {0} did not drop its capabilities within 5 s (is signal {1} blocked?)")]
    Unresponsive(i32, i32),
    #[error("signal {0} already has a handler; cannot broadcast the capability drop")]
    SignalInUse(i32),
    #[error("thread {tid} still holds {what} after the drop")]
    Incomplete { tid: i32, what: String },
}

// Shared with the signal handler: what to do, and each thread's answer.
const SLOTS: usize = 4096;
static KEEP: AtomicU64 = AtomicU64::new(0);
static DROP_BOUNDING: AtomicBool = AtomicBool::new(false);
static TIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
/// 0: pending; 1: done; negative: -errno.
static RESULTS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
/// One drop at a time.
static BUSY: Mutex<()> = Mutex::new(());

fn broadcast_signal() -> i32 {
    libc::SIGRTMAX() - 2
}

/// Keeps `keep` (those of them held now), drops every other capability in
/// every thread of this process, and sets no_new_privs. Call it once the
/// mount is up.
pub fn drop_privileges(keep: &[Cap]) -> Result<DroppedReport, PrivilegeError> {
    let _busy = BUSY.lock().unwrap_or_else(|e| e.into_inner());
    let before = read_caps().map_err(PrivilegeError::Read)?;
    let want: u64 = keep.iter().fold(0, |m, c| m | c.bit());
    let bounding = before.effective & Cap::Setpcap.bit() != 0;
    KEEP.store(want, Ordering::SeqCst);
    DROP_BOUNDING.store(bounding, Ordering::SeqCst);

    let threads = {
        let _handler = HandlerGuard::install()?;
        every_other_thread()?
    } + 1;
    // SAFETY: plain syscalls on this thread.
    unsafe { apply_to_this_thread(want, bounding) }.map_err(|errno| PrivilegeError::Drop {
        tid: gettid(),
        error: std::io::Error::from_raw_os_error(errno),
    })?;
    verify_all_threads(want & before.permitted, bounding)?;

    let held = before.permitted;
    let collect =
        |pred: &dyn Fn(Cap) -> bool| Cap::ALL.iter().copied().filter(|&c| pred(c)).collect();
    Ok(DroppedReport {
        kept: collect(&|c| want & c.bit() != 0 && held & c.bit() != 0),
        not_held: collect(&|c| want & c.bit() != 0 && held & c.bit() == 0),
        dropped: collect(&|c| want & c.bit() == 0 && held & c.bit() != 0),
        bounding_set_dropped: bounding,
        threads,
    })
}

/// Signals every thread but this one until a pass over
/// `/proc/self/task` finds none left: a thread made meanwhile by a thread
/// not yet done shows up in the next pass; one made by a thread already
/// done inherits the dropped set. Returns how many threads were changed.
fn every_other_thread() -> Result<usize, PrivilegeError> {
    let me = gettid();
    let signal = broadcast_signal();
    let mut done: HashSet<i32> = HashSet::from([me]);
    loop {
        let fresh: Vec<i32> = list_threads()
            .map_err(PrivilegeError::Read)?
            .into_iter()
            .filter(|t| !done.contains(t))
            .collect();
        if fresh.is_empty() {
            return Ok(done.len() - 1);
        }
        for chunk in fresh.chunks(SLOTS) {
            for slot in TIDS.iter() {
                slot.store(0, Ordering::SeqCst);
            }
            for (i, &tid) in chunk.iter().enumerate() {
                RESULTS[i].store(0, Ordering::SeqCst);
                TIDS[i].store(tid, Ordering::SeqCst);
            }
            for (i, &tid) in chunk.iter().enumerate() {
                // SAFETY: tgkill with our own pid and a tid read from /proc.
                let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal) };
                if rc != 0 {
                    // ESRCH: the thread ended; nothing left to change.
                    RESULTS[i].store(1, Ordering::SeqCst);
                }
            }
            let start = Instant::now();
            for (i, &tid) in chunk.iter().enumerate() {
                loop {
                    match RESULTS[i].load(Ordering::SeqCst) {
                        1 => break,
                        0 => {}
                        errno => {
                            return Err(PrivilegeError::Drop {
                                tid,
                                error: std::io::Error::from_raw_os_error(-errno),
                            })
                        }
                    }
                    if !std::path::Path::new(&format!("/proc/self/task/{tid}")).exists() {
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(5) {
                        return Err(PrivilegeError::Unresponsive(tid, signal));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            for slot in TIDS.iter().take(chunk.len()) {
                slot.store(0, Ordering::SeqCst);
            }
            done.extend(chunk);
        }
    }
}

/// Our handler on the broadcast signal while the drop runs; the previous
/// (default) disposition comes back on drop.
struct HandlerGuard {
    old: libc::sigaction,
}

impl HandlerGuard {
    fn install() -> Result<HandlerGuard, PrivilegeError> {
        let signal = broadcast_signal();
        // SAFETY: sigaction with zeroed, then filled, structs; the handler
        // only makes async-signal-safe raw syscalls and atomic stores.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) != 0 {
                return Err(PrivilegeError::Read(std::io::Error::last_os_error()));
            }
            if old.sa_sigaction != libc::SIG_DFL {
                return Err(PrivilegeError::SignalInUse(signal));
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                return Err(PrivilegeError::Read(std::io::Error::last_os_error()));
            }
            Ok(HandlerGuard { old })
        }
    }
}

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        // SAFETY: restores the disposition read in install().
        unsafe { libc::sigaction(broadcast_signal(), &self.old, std::ptr::null_mut()) };
    }
}

extern "C" fn on_signal(_signal: libc::c_int) {
    // SAFETY: errno is thread-local; we put it back as we found it. The
    // rest is raw syscalls and atomics, all async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let tid = gettid();
        let result = match apply_to_this_thread(
            KEEP.load(Ordering::SeqCst),
            DROP_BOUNDING.load(Ordering::SeqCst),
        ) {
            Ok(()) => 1,
            Err(e) => -e.max(1),
        };
        if let Some(i) = TIDS.iter().position(|t| t.load(Ordering::SeqCst) == tid) {
            RESULTS[i].store(result, Ordering::SeqCst);
        }
        *libc::__errno_location() = errno;
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// This thread's sets, as 64-bit masks.
#[derive(Debug, Clone, Copy)]
struct CapSets {
    effective: u64,
    permitted: u64,
}

fn read_caps() -> std::io::Result<CapSets> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and room for two data structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| u64::from(lo) | (u64::from(hi) << 32);
    Ok(CapSets {
        effective: join(data[0].effective, data[1].effective),
        permitted: join(data[0].permitted, data[1].permitted),
    })
}

/// The drop, on the calling thread only. Raw syscalls only: this runs in a
/// signal handler. Err(errno).
unsafe fn apply_to_this_thread(keep: u64, drop_bounding: bool) -> Result<(), i32> {
    let errno = || *libc::__errno_location();
    if drop_bounding {
        // Up to the kernel's last capability: CAPBSET_READ fails past it.
        for cap in 0..64u64 {
            let held = libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0);
            if held < 0 {
                break;
            }
            if held == 1
                && keep & (1 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
            {
                return Err(errno());
            }
        }
    }
    // Kernels before 4.3 have no ambient set (EINVAL): nothing to clear.
    if libc::prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
        && errno() != libc::EINVAL
    {
        return Err(errno());
    }
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
        return Err(errno());
    }
    for (i, d) in data.iter_mut().enumerate() {
        let keep_half = (keep >> (32 * i)) as u32;
        d.permitted &= keep_half;
        d.effective = d.permitted;
        d.inheritable = 0;
    }
    if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
        return Err(errno());
    }
    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
        return Err(errno());
    }
    Ok(())
}

fn gettid() -> i32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

fn list_threads() -> std::io::Result<Vec<i32>> {
    Ok(std::fs::read_dir("/proc/self/task")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// The sets of one thread as `/proc/self/task/TID/status` shows them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ThreadStatus {
    inheritable: u64,
    permitted: u64,
    effective: u64,
    bounding: u64,
    ambient: u64,
    no_new_privs: bool,
}

fn thread_status(tid: i32) -> std::io::Result<ThreadStatus> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/status"))?;
    let mut s = ThreadStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let hex = || u64::from_str_radix(value.trim(), 16).unwrap_or(u64::MAX);
        match key {
            "CapInh" => s.inheritable = hex(),
            "CapPrm" => s.permitted = hex(),
            "CapEff" => s.effective = hex(),
            "CapBnd" => s.bounding = hex(),
            "CapAmb" => s.ambient = hex(),
            "NoNewPrivs" => s.no_new_privs = value.trim() == "1",
            _ => {}
        }
    }
    Ok(s)
}

/// Every thread holds exactly `kept`, and has no_new_privs.
fn verify_all_threads(kept: u64, bounding: bool) -> Result<(), PrivilegeError> {
    for tid in list_threads().map_err(PrivilegeError::Read)? {
        let Ok(s) = thread_status(tid) else {
            continue; // ended meanwhile
        };
        let bad = |what: String| Err(PrivilegeError::Incomplete { tid, what });
        if s.permitted & !kept != 0 || s.effective & !kept != 0 {
            return bad(format!(
                "permitted {:#x}, effective {:#x}",
                s.permitted, s.effective
            ));
        }
        if s.inheritable != 0 || s.ambient != 0 {
            return bad("inheritable or ambient capabilities".into());
        }
        if bounding && s.bounding & !kept != 0 {
            return bad(format!("bounding set {:#x}", s.bounding));
        }
        if !s.no_new_privs {
            return bad("no no_new_privs".into());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// Runs `f` in a forked child so that this test process keeps its own
    /// privileges; returns the child's verdict. Bounded to 30 s.
    fn in_child(f: impl FnOnce() -> Result<String, String>) -> Result<String, String> {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the privilege tests need root (they drop capabilities in a child)"
        );
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child only runs `f` and exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            unsafe { libc::close(fds[0]) };
            let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err("the child panicked".into()));
            let text = match verdict {
                Ok(s) => format!("ok:{s}"),
                Err(e) => format!("err:{e}"),
            };
            unsafe {
                libc::write(fds[1], text.as_ptr().cast(), text.len());
                libc::_exit(0);
            }
        }
        unsafe { libc::close(fds[1]) };
        let mut pfd = libc::pollfd {
            fd: fds[0],
            events: libc::POLLIN,
            revents: 0,
        };
        // Wait for the child's answer (EOF comes when it exits).
        let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
        if ready <= 0 {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut text = String::new();
        let mut pipe = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let _ = pipe.read_to_string(&mut text);
        let mut status = 0;
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

    fn all_threads() -> Vec<ThreadStatus> {
        list_threads()
            .unwrap()
            .into_iter()
            .filter_map(|t| thread_status(t).ok())
            .collect()
    }

    /// A fresh directory name for a tmpfs, chosen in the parent.
    fn scratch(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("secretfs-priv-{tag}-{}", std::process::id()))
    }

    /// Mounts a tmpfs at `dir` (needs CAP_SYS_ADMIN).
    fn tmpfs(dir: &std::path::Path) {
        std::fs::create_dir_all(dir).unwrap();
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        let rc = unsafe {
            libc::mount(
                c"none".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
    }

    fn umount(dir: &std::path::Path) -> std::io::Result<()> {
        let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    #[test]
    fn every_thread_keeps_only_what_the_mount_needs() {
        let before = thread_status(gettid()).unwrap();
        let mnt = scratch("keep");
        let out = in_child(|| {
            // Threads that exist before the drop, busy and asleep.
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let workers: Vec<_> = (0..3)
                .map(|i| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            if i == 0 {
                                std::hint::spin_loop();
                            } else {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    })
                })
                .collect();
            tmpfs(&mnt);
            let report = drop_privileges(MOUNT_KEEPS).map_err(|e| e.to_string())?;
            let want = Cap::SysAdmin.bit() | Cap::IpcLock.bit();
            let threads = all_threads();
            ensure!(
                threads.len() == 4,
                "expected 4 threads, saw {}",
                threads.len()
            );
            for s in &threads {
                ensure!(
                    s.effective == want && s.permitted == want,
                    "thread sets: {s:?}"
                );
                ensure!(s.bounding == want, "bounding set: {:#x}", s.bounding);
                ensure!(s.inheritable == 0 && s.ambient == 0, "inh/amb: {s:?}");
                ensure!(s.no_new_privs, "no_new_privs missing: {s:?}");
            }
            ensure!(report.threads == 4, "report: {report:?}");
            ensure!(
                report.kept == vec![Cap::IpcLock, Cap::SysAdmin],
                "{report:?}"
            );
            ensure!(report.dropped.contains(&Cap::Chown), "{report:?}");
            ensure!(report.dropped.contains(&Cap::DacOverride), "{report:?}");
            ensure!(report.bounding_set_dropped, "{report:?}");
            // A thread started afterwards inherits the dropped sets.
            let late = std::thread::spawn(|| thread_status(gettid()).unwrap())
                .join()
                .unwrap();
            ensure!(
                late.effective == want && late.no_new_privs,
                "late: {late:?}"
            );
            // What was kept works: unmount (CAP_SYS_ADMIN), mlock beyond
            // the 8 MiB limit (CAP_IPC_LOCK).
            umount(&mnt).map_err(|e| format!("umount with CAP_SYS_ADMIN kept: {e}"))?;
            let big = vec![1u8; 16 << 20];
            let rc = unsafe { libc::mlock(big.as_ptr().cast(), big.len()) };
            ensure!(
                rc == 0,
                "mlock 16 MiB with CAP_IPC_LOCK: {}",
                std::io::Error::last_os_error()
            );
            // What was dropped is gone: chown to another user.
            let f = std::env::temp_dir().join(format!("secretfs-priv-f-{}", std::process::id()));
            std::fs::write(&f, b"x").map_err(|e| e.to_string())?;
            let chown = std::os::unix::fs::chown(&f, Some(12345), None);
            let _ = std::fs::remove_file(&f);
            ensure!(chown.is_err(), "chown worked without CAP_CHOWN");
            stop.store(true, Ordering::Relaxed);
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
        assert_eq!(thread_status(gettid()).unwrap(), before);
    }

    #[test]
    fn the_caller_check_needs_no_capability() {
        let mnt = scratch("none");
        let out = in_child(|| {
            tmpfs(&mnt);
            // Another user's non-dumpable process: a child that drops to
            // nobody and waits.
            let mut fds = [0; 2];
            unsafe { libc::pipe(fds.as_mut_ptr()) };
            let target = unsafe { libc::fork() };
            if target == 0 {
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
            unsafe { libc::close(fds[0]) };
            std::thread::sleep(Duration::from_millis(100));
            let report = drop_privileges(&[]).map_err(|e| e.to_string())?;
            let s = thread_status(gettid()).map_err(|e| e.to_string())?;
            ensure!(
                s.effective == 0 && s.permitted == 0 && s.bounding == 0,
                "{s:?}"
            );
            let cgroup = std::fs::read_to_string(format!("/proc/{target}/cgroup"));
            let stat = std::fs::read_to_string(format!("/proc/{target}/stat"));
            let status = std::fs::read_to_string(format!("/proc/{target}/status"));
            // Without CAP_SYS_ADMIN our own mount can no longer be removed.
            let umount_err = umount(&mnt).err();
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
                umount_err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::EPERM),
                "umount without CAP_SYS_ADMIN: {umount_err:?}"
            );
            ensure!(
                report.kept.is_empty() && report.dropped.contains(&Cap::SysAdmin),
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
            drop_privileges(&[Cap::SysAdmin, Cap::Setpcap]).map_err(|e| e.to_string())?;
            let report = drop_privileges(MOUNT_KEEPS).map_err(|e| e.to_string())?;
            ensure!(report.kept == vec![Cap::SysAdmin], "{report:?}");
            ensure!(report.not_held == vec![Cap::IpcLock], "{report:?}");
            ensure!(report.dropped == vec![Cap::Setpcap], "{report:?}");
            let s = thread_status(gettid()).map_err(|e| e.to_string())?;
            ensure!(s.effective == Cap::SysAdmin.bit(), "{s:?}");
            Ok(report.to_string())
        })
        .unwrap();
        assert!(
            out.contains("not held to begin with: CAP_IPC_LOCK"),
            "{out}"
        );
    }

    #[test]
    fn cap_numbers_match_the_kernel() {
        assert_eq!(Cap::ALL.len(), 41);
        for (i, c) in Cap::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
        assert_eq!(Cap::SysAdmin.bit(), 1 << 21);
        // The kernel's own last capability is one we know.
        let last: usize = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(last < Cap::ALL.len(), "kernel knows capability {last}");
    }
}
