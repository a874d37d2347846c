//! `secretfs mount --background`: a mount a script can wait for.
//!
//! This process mounts nothing. It binds a private notify socket (in a new
//! 0700 directory, so only this user can send to it), starts itself again
//! with the same arguments (`--background` replaced by the hidden
//! `--background-child`, which makes the child leave the terminal's
//! session), `NOTIFY_SOCKET` pointing at the socket, stdin and stdout
//! /dev/null, and waits:
//! - `READY=1` (sent after the first sync and the mount, as to systemd):
//!   print the child's pid on stdout (for `pid=$(...)`) and "mounted at
//!   PATH, pid N" on stderr, exit 0; the child keeps serving.
//! - the child exits first: print the reason it sent (`STATUS=failed: ...`)
//!   or its exit status, exit non-zero. Nothing is left mounted: the child
//!   mounts only after everything else worked.
//!
//! The child's log goes to `--log-file` (appended, created 0600; never
//! through a symlink, never a file of another user's), else to
//! this process's stderr when that is a terminal, else nowhere: a pipe
//! held open by a daemon would make `$(secretfs mount --background ...)`
//! or `| tee` wait for the mount to end.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::args::MountArgs;
use crate::fail::UsageError;

/// What `--background` needs from the command line.
pub struct Launch {
    mountpoint: PathBuf,
    log_file: Option<PathBuf>,
    start_timeout: Duration,
}

/// Longer than the child's own limit on the first sync: it reports that
/// itself; this only catches a child that hangs.
const GRACE: Duration = Duration::from_secs(60);

impl Launch {
    pub fn new(args: &MountArgs) -> Launch {
        Launch {
            mountpoint: std::path::absolute(&args.mountpoint)
                .unwrap_or_else(|_| args.mountpoint.clone()),
            log_file: args.log_file.clone(),
            start_timeout: args.start_timeout,
        }
    }

    pub fn run(self) -> Result<()> {
        let dir = private_dir()?;
        let socket_path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&socket_path)
            .with_context(|| format!("cannot bind the notify socket {}", socket_path.display()))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stderr = match &self.log_file {
            Some(path) => Stdio::from(open_log_file(path)?),
            None if std::io::stderr().is_terminal() => Stdio::inherit(),
            None => Stdio::null(),
        };
        let exe = std::env::current_exe().context("cannot find this program to start the mount")?;
        let mut child = Command::new(exe)
            .args(child_args(std::env::args_os().skip(1)))
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start the mount process")?;
        let deadline = Instant::now() + self.start_timeout + GRACE;
        let mut last_status: Option<String> = None;
        let mut buf = vec![0u8; 4096];
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    if read_message(&buf[..n], &mut last_status) {
                        // The pid alone on stdout, for `pid=$(...)`; the
                        // sentence for people on stderr.
                        println!("{}", child.id());
                        eprintln!(
                            "mounted at {}, pid {}",
                            self.mountpoint.display(),
                            child.id()
                        );
                        return Ok(());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("reading the notify socket"),
            }
            if let Some(exit) = child.try_wait()? {
                // Whatever it sent just before it went.
                socket.set_nonblocking(true)?;
                while let Ok(n) = socket.recv(&mut buf) {
                    read_message(&buf[..n], &mut last_status);
                }
                let reason = match last_status {
                    Some(s) => s.strip_prefix("failed: ").unwrap_or(&s).to_owned(),
                    None => format!(
                        "the mount exited ({exit}) before it was ready{}",
                        self.log_hint()
                    ),
                };
                if exit.code() == Some(i32::from(crate::EXIT_USAGE)) {
                    return Err(UsageError(reason).into());
                }
                bail!("{reason}");
            }
            if Instant::now() > deadline {
                stop(&mut child);
                bail!(
                    "the mount was not ready after {}: stopped it{}",
                    humantime::format_duration(self.start_timeout + GRACE),
                    self.log_hint()
                );
            }
        }
    }

    fn log_hint(&self) -> String {
        match &self.log_file {
            Some(p) => format!("; its log is in {}", p.display()),
            None => "; run it again with --log-file PATH to keep its log".to_owned(),
        }
    }
}

/// Opens `--log-file` for appending (created 0600). The mount often runs
/// as root, so the path is not trusted: a symlink is not followed
/// (O_NOFOLLOW), a device or FIFO is refused (and never becomes a
/// controlling terminal, O_NOCTTY), as is a file another user owns; an
/// existing file others may read is made 0600 through the open descriptor.
fn open_log_file(path: &Path) -> Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let cannot = || format!("cannot open the log file {} (--log-file)", path.display());
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NOCTTY
                | rustix::fs::OFlags::NONBLOCK)
                .bits() as i32,
        )
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(n) if n == rustix::io::Errno::LOOP.raw_os_error() => anyhow::anyhow!(
                "it is a symbolic link, which the mount does not follow: give the real path"
            ),
            _ => e.into(),
        })
        .with_context(cannot)?;
    let meta = file.metadata().with_context(cannot)?;
    if !meta.file_type().is_file() {
        bail!("{}: it is not a regular file; give a file path", cannot());
    }
    let euid = rustix::process::geteuid().as_raw();
    if meta.uid() != euid {
        bail!(
            "{}: it is owned by uid {}, not by this user (uid {euid}); give a file of your own",
            cannot(),
            meta.uid()
        );
    }
    if meta.mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(cannot)?;
    }
    // O_NONBLOCK only kept a FIFO from blocking the open.
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::APPEND).with_context(cannot)?;
    Ok(file)
}

/// How long a hung child gets to unmount and exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Stops a child that never became ready: SIGTERM first (the mount
/// unmounts whatever it did and exits), SIGKILL if it is still there after
/// [`STOP_GRACE`].
fn stop(child: &mut std::process::Child) {
    let pid = rustix::process::Pid::from_child(child);
    if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok() {
        let until = Instant::now() + STOP_GRACE;
        while Instant::now() < until {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Reads one sd_notify datagram: true on `READY=1`; keeps the last STATUS.
fn read_message(datagram: &[u8], last_status: &mut Option<String>) -> bool {
    let text = String::from_utf8_lossy(datagram);
    let mut ready = false;
    for line in text.lines() {
        if line == "READY=1" {
            ready = true;
        } else if let Some(status) = line.strip_prefix("STATUS=") {
            *last_status = Some(crate::output::printable(status).into_owned());
        }
    }
    ready
}

/// The child's arguments: ours with `--background` made `--background-child`
/// and `--log-file` taken out (this process opened it). Only options before
/// a `--` are touched.
fn child_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.peekable();
    let mut options = true;
    while let Some(arg) = args.next() {
        if options {
            if arg == "--" {
                options = false;
            } else if arg == "--background" {
                out.push(OsString::from("--background-child"));
                continue;
            } else if arg == "--log-file" {
                args.next();
                continue;
            } else if arg.as_encoded_bytes().starts_with(b"--log-file=") {
                continue;
            }
        }
        out.push(arg);
    }
    out
}

/// Where the private directory goes: `XDG_RUNTIME_DIR` when it is a
/// directory of this user's that nobody else may write to (it is inherited
/// through sudo and the environment), else the temporary directory.
fn runtime_base(xdg: Option<PathBuf>) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let euid = rustix::process::geteuid().as_raw();
    xdg.filter(|p| {
        std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.is_dir() && m.uid() == euid && m.mode() & 0o022 == 0)
    })
    .unwrap_or_else(std::env::temp_dir)
}

/// A new directory only this user can enter (0700, a name nobody else
/// picked), removed on drop.
fn private_dir() -> Result<tempfile::TempDir> {
    let base = runtime_base(std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from));
    tempfile::Builder::new()
        .prefix("secretfs-mount-")
        .tempdir_in(&base)
        .with_context(|| {
            format!(
                "cannot create a private directory for the notify socket in {}",
                base.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_child_gets_our_arguments_without_background() {
        let given = args(&[
            "--server",
            "https://s:1",
            "mount",
            "/mnt",
            "--background",
            "--log-file",
            "/var/log/m.log",
            "--refresh=1m",
            "--log-file=/x",
        ]);
        assert_eq!(
            child_args(given.into_iter()),
            args(&[
                "--server",
                "https://s:1",
                "mount",
                "/mnt",
                "--background-child",
                "--refresh=1m"
            ])
        );
        let given = args(&["mount", "--background", "--", "--background"]);
        assert_eq!(
            child_args(given.into_iter()),
            args(&["mount", "--background-child", "--", "--background"])
        );
    }

    #[test]
    fn the_log_file_is_never_a_planted_link_or_someone_elses() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("shadow");
        std::fs::write(&target, "root:x:0:0\n").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
        let link = dir.path().join("m.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_log_file(&link).unwrap_err();
        assert!(format!("{err:#}").contains("m.log"), "{err:#}");
        assert_eq!(std::fs::read(&target).unwrap(), b"root:x:0:0\n");
        assert_eq!(
            std::fs::metadata(&target).unwrap().mode() & 0o777,
            0o644,
            "the link's target is not touched"
        );

        // Not a regular file: a FIFO (which must not block the open either).
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        let err = open_log_file(&fifo).unwrap_err();
        assert!(format!("{err:#}").contains("fifo"), "{err:#}");
        let err = open_log_file(Path::new("/dev/null")).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");

        // Someone else's file (the tests run as root: give it away).
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs.log");
            std::fs::write(&theirs, "").unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = open_log_file(&theirs).unwrap_err();
            assert!(format!("{err:#}").contains("owned by"), "{err:#}");
        }

        // An existing file others can read is made private.
        let mine = dir.path().join("mine.log");
        std::fs::write(&mine, "old\n").unwrap();
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_log_file(&mine).unwrap());
        assert_eq!(std::fs::metadata(&mine).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read(&mine).unwrap(),
            b"old\n",
            "appended, not truncated"
        );
    }

    #[test]
    fn the_runtime_dir_is_used_only_when_it_is_ours_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(runtime_base(Some(ours.clone())), ours);
        assert_eq!(runtime_base(None), std::env::temp_dir());
        let open = dir.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(runtime_base(Some(open)), std::env::temp_dir());
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        assert_eq!(runtime_base(Some(link)), std::env::temp_dir());
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            assert_eq!(runtime_base(Some(theirs)), std::env::temp_dir());
        }
    }

    #[test]
    fn a_hung_child_gets_sigterm_first() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = Command::new("sleep").arg("600").spawn().unwrap();
        stop(&mut child);
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(15), "{status:?}");
    }

    #[test]
    fn notify_messages() {
        let mut status = None;
        assert!(!read_message(b"STATUS=failed: no\nERRNO=1\n", &mut status));
        assert_eq!(status.as_deref(), Some("failed: no"));
        assert!(read_message(b"READY=1\nSTATUS=mounted\n", &mut status));
        assert_eq!(status.as_deref(), Some("mounted"));
    }
}
