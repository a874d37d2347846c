//! `secretfs mount --background`: a mount a script can wait for.
//!
//! This process mounts nothing. It binds a private notify socket (in a new
//! 0700 directory, so only this user can send to it), starts itself again
//! with the same arguments (`--background` replaced by the hidden
//! `--background-child`, which makes the child leave the terminal's
//! session), `NOTIFY_SOCKET` pointing at the socket, stdin and stdout
//! /dev/null, and waits:
//! - `READY=1` (sent after the first sync and the mount, as to systemd):
//!   print "mounted at PATH, pid N", exit 0; the child keeps serving.
//! - the child exits first: print the reason it sent (`STATUS=failed: ...`)
//!   or its exit status, exit non-zero. Nothing is left mounted: the child
//!   mounts only after everything else worked.
//!
//! The child's log goes to `--log-file` (appended, created 0600), else to
//! this process's stderr when that is a terminal, else nowhere: a pipe
//! held open by a daemon would make `$(secretfs mount --background ...)`
//! or `| tee` wait for the mount to end.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

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
        let dir = PrivateDir::new()?;
        let socket_path = dir.0.join("notify");
        let socket = UnixDatagram::bind(&socket_path)
            .with_context(|| format!("cannot bind the notify socket {}", socket_path.display()))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stderr = match &self.log_file {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| {
                        format!("cannot open the log file {} (--log-file)", path.display())
                    })?,
            ),
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
                        println!(
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
                let _ = child.kill();
                let _ = child.wait();
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

/// A new directory only this user can enter, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new() -> Result<PrivateDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let mut last = None;
        for attempt in 0..16u32 {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
            let path = base.join(format!(
                "secretfs-mount-{}-{nanos:x}{attempt}",
                std::process::id()
            ));
            // mkdir fails on anything already there, a planted symlink too.
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried")).with_context(|| {
            format!(
                "cannot create a private directory for the notify socket in {}",
                base.display()
            )
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new(&self.0));
    }
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
    fn notify_messages() {
        let mut status = None;
        assert!(!read_message(b"STATUS=failed: no\nERRNO=1\n", &mut status));
        assert_eq!(status.as_deref(), Some("failed: no"));
        assert!(read_message(b"READY=1\nSTATUS=mounted\n", &mut status));
        assert_eq!(status.as_deref(), Some("mounted"));
    }
}
