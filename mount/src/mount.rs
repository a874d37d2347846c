//! The mount's life: check the mountpoint (clearing a dead mount left by a
//! crash), mount, and unmount cleanly.
//!
//! fuser 0.18 pitfalls handled here:
//! - Dropping a session while a file is open leaves a dead mount (ENOTCONN)
//!   that blocks the next mount at that path. So shutdown detaches the mount
//!   itself (`umount2(MNT_DETACH)`) before the session goes, and start-up
//!   clears any dead mount it finds.
//! - `AutoUnmount` needs `fusermount3`; never used. As root fuser mounts with
//!   mount(2) directly.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Notifier, Session, SessionACL};

use crate::error::MountError;
use crate::fuse::SecretFs;

/// Source name shown in /proc/mounts (`secretfs on /path type fuse`).
pub const FS_NAME: &str = "secretfs";

/// Fails early, with advice, when this process cannot mount FUSE at all.
pub fn check_fuse() -> Result<(), MountError> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::FuseUnavailable(
                "/dev/fuse is missing: load the module (modprobe fuse) or, in a container, \
                 pass the device (--device /dev/fuse)"
                    .into(),
            ))
        }
        Err(e) => {
            return Err(MountError::FuseUnavailable(format!(
                "cannot open /dev/fuse ({e}): run the mount as root"
            )))
        }
    }
    if !rustix::process::geteuid().is_root() {
        return Err(MountError::FuseUnavailable(
            "mounting needs root (CAP_SYS_ADMIN): run the mount as root; it serves the files \
             to other users itself (allow_other)"
                .into(),
        ));
    }
    Ok(())
}

/// `--create-mountpoint`: creates `path` and any missing parents, each
/// mode 0755 whatever the umask (a fresh Kubernetes emptyDir, /run after a
/// reboot). An existing path is left as it is for the checks that follow.
pub fn create_mountpoint(path: &Path) -> Result<(), MountError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| MountError::Mountpoint {
        path: path.to_owned(),
        source,
    };
    let abs = std::path::absolute(path).map_err(err)?;
    // The missing ancestors, nearest to the root first.
    let mut missing = Vec::new();
    let mut at = abs.as_path();
    while fs::symlink_metadata(at).is_err() {
        missing.push(at.to_owned());
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    for dir in missing.iter().rev() {
        match fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {
                chmod_new_dir(dir).map_err(err)?;
                tracing::info!(path = %dir.display(), "created the mountpoint directory");
            }
            // Made by someone else meanwhile: fine, the checks follow.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// 0755 on a directory just made (the umask may have taken bits), through
/// a descriptor: the mount runs as root, and a path swapped for a symlink
/// between the mkdir and the chmod must not make root chmod its target.
fn chmod_new_dir(dir: &Path) -> io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))?;
    Ok(())
}

/// Checks that `path` is an empty directory we may mount on, first
/// detaching a dead FUSE mount left there by an earlier crash. Returns the
/// absolute path.
pub fn prepare_mountpoint(path: &Path) -> Result<PathBuf, MountError> {
    let abs = std::path::absolute(path).map_err(|source| MountError::Mountpoint {
        path: path.to_owned(),
        source,
    })?;
    // Several crashes can stack several dead mounts.
    for _ in 0..8 {
        // A dead mount can still answer stat from the kernel's attribute
        // cache (our TTLs are long), so ask the daemon itself: statfs is
        // never cached by FUSE and fails with ENOTCONN once it is gone.
        if is_secretfs_mount(&abs) && statfs_errno(&abs) == Some(libc::ENOTCONN) {
            tracing::warn!(path = %abs.display(), "clearing a dead secretfs mount left by an earlier run");
            detach(&abs).map_err(|source| MountError::StaleMount {
                path: abs.clone(),
                source,
            })?;
            continue;
        }
        match fs::metadata(&abs) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                tracing::warn!(path = %abs.display(), "clearing a dead FUSE mount left by an earlier run");
                detach(&abs).map_err(|source| MountError::StaleMount {
                    path: abs.clone(),
                    source,
                })?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(MountError::MountpointMissing(abs))
            }
            Err(source) => return Err(MountError::Mountpoint { path: abs, source }),
            Ok(md) if !md.is_dir() => return Err(MountError::NotADirectory(abs)),
            Ok(_) => {
                if is_secretfs_mount(&abs) {
                    // It answers (stat worked), so another mount serves it.
                    return Err(MountError::AlreadyMounted(abs));
                }
                let mut entries = fs::read_dir(&abs).map_err(|source| MountError::Mountpoint {
                    path: abs.clone(),
                    source,
                })?;
                if entries.next().is_some() {
                    return Err(MountError::NotEmpty(abs));
                }
                return Ok(abs);
            }
        }
    }
    Err(MountError::StaleMount {
        path: abs,
        source: io::Error::other("still not usable after detaching 8 mounts"),
    })
}

/// The errno of statfs(2) on `path`, if it fails.
fn statfs_errno(path: &Path) -> Option<i32> {
    rustix::fs::statfs(path).err().map(|e| e.raw_os_error())
}

/// Whether /proc/self/mountinfo lists a secretfs mount at `path`.
fn is_secretfs_mount(path: &Path) -> bool {
    let Ok(mounts) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    mounts.into_iter().any(|m| {
        // procfs 0.18 hands the mount point over with its escapes intact.
        unescape_mountinfo(&m.mount_point.to_string_lossy()) == want
            && m.fs_type.starts_with("fuse")
            && m.mount_source.as_deref() == Some(FS_NAME)
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // One byte in octal, so at most `\377`: the first digit is 0-3.
        if b[i] == b'\\'
            && i + 3 < b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn detach(path: &Path) -> io::Result<()> {
    rustix::mount::unmount(path, rustix::mount::UnmountFlags::DETACH)?;
    Ok(())
}

/// A live mount.
pub struct Mounted {
    session: BackgroundSession,
    path: PathBuf,
    /// Kernel device number of the connection, to abort it via fusectl if
    /// open files keep a detached mount alive at shutdown.
    conn: Option<u64>,
}

/// The options every secretfs mount gets.
pub fn config() -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::NoAtime,
        MountOption::DefaultPermissions,
        MountOption::FSName(FS_NAME.into()),
        MountOption::Subtype(FS_NAME.into()),
    ];
    // allow_other: the container's user is not the mount's (root).
    config.acl = SessionACL::All;
    config
}

/// Mounts `fs` at `path` (blocking: mount(2) plus the INIT handshake) and
/// serves it on a background thread.
pub fn mount(fs: SecretFs, path: &Path) -> Result<Mounted, MountError> {
    let session = Session::new(fs, path, &config()).map_err(|source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            MountError::FuseUnavailable(format!(
                "mount at {} was refused ({source}): run the mount as root with CAP_SYS_ADMIN",
                path.display()
            ))
        } else {
            MountError::Mount {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    let session = session.spawn().map_err(|source| MountError::Mount {
        path: path.to_owned(),
        source,
    })?;
    let conn = fs::metadata(path).ok().map(|md| {
        let dev = md.dev();
        // fusectl names connections by the kernel's dev_t (major << 20 | minor).
        (u64::from(libc::major(dev)) << 20) | u64::from(libc::minor(dev))
    });
    Ok(Mounted {
        session,
        path: path.to_owned(),
        conn,
    })
}

impl Mounted {
    pub fn notifier(&self) -> Notifier {
        self.session.notifier()
    }

    /// Detaches the mount, then waits up to `grace` for the kernel to
    /// release the connection (it does when the last open file closes). If
    /// files stay open, the connection is aborted through fusectl when
    /// available, so their readers get ENOTCONN rather than old bytes.
    pub fn unmount(self, grace: Duration) {
        match detach(&self.path) {
            Ok(()) => tracing::info!(path = %self.path.display(), "unmounted"),
            // Someone unmounted it already (EINVAL: not a mount point).
            Err(e) => tracing::debug!(error = %e, "detach at shutdown"),
        }
        let (tx, rx) = mpsc::channel();
        let mut session = self.session;
        // fuser 0.18's `Mount::drop` takes POLLERR on the device (connection
        // gone) for "still mounted" and unmounts the *path*, which by then may
        // hold a new mount (seen in tests: "FUSE device disconnected during
        // handshake"). We detached already, so its unmount must never run:
        // keep the thread handle and forget the rest (one fd, freed at exit).
        let guard = std::mem::replace(&mut session.guard, std::thread::spawn(|| Ok(())));
        std::mem::forget(session);
        // The thread ends once the kernel ends the connection (when the last
        // open file under the detached mount closes).
        std::thread::spawn(move || {
            let res = guard
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the FUSE session thread panicked")));
            let _ = tx.send(res);
        });
        if wait(&rx, grace) {
            return;
        }
        let aborted = self
            .conn
            .is_some_and(|c| fs::write(format!("/sys/fs/fuse/connections/{c}/abort"), "1").is_ok());
        if aborted && wait(&rx, Duration::from_secs(2)) {
            tracing::info!("aborted the FUSE connection kept alive by open files");
            return;
        }
        tracing::warn!(
            "files under the detached mount are still open; the connection ends when they close \
             or this process exits"
        );
    }
}

fn wait(rx: &mpsc::Receiver<io::Result<()>>, d: Duration) -> bool {
    match rx.recv_timeout(d) {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "FUSE session ended with an error");
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_new_directory_swapped_for_a_symlink_is_not_chmod_ed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("shadow");
        fs::write(&target, b"x").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        // Made, then swapped for a symlink before the chmod.
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        fs::remove_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&target, &dir).unwrap();
        assert!(chmod_new_dir(&dir).is_err());
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the link's target keeps its mode");
    }
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), b"/plain");
        assert_eq!(unescape_mountinfo(r"/x\134"), b"/x\\");
        // Found by the property tests: `\777` overflowed a byte (a panic);
        // what is not a byte in octal is kept as it is.
        assert_eq!(unescape_mountinfo(r"/a\777"), br"/a\777");
        assert_eq!(unescape_mountinfo(r"/a\400\377"), b"/a\\400\xff");
    }

    #[test]
    fn mountpoint_checks() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(prepare_mountpoint(dir.path()).unwrap(), dir.path());
        let missing = dir.path().join("missing");
        assert!(matches!(
            prepare_mountpoint(&missing),
            Err(MountError::MountpointMissing(_))
        ));
        let file = dir.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            prepare_mountpoint(&file),
            Err(MountError::NotADirectory(_))
        ));
        let err = prepare_mountpoint(dir.path()).unwrap_err();
        assert!(matches!(err, MountError::NotEmpty(_)));
        assert!(err.to_string().contains("not empty"));
    }
}

#[cfg(test)]
mod prop_tests;
