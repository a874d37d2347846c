//! sd_notify: tells a supervisor (systemd with `Type=notify`, or the parent
//! of `secretfs mount --background`) that the mount is ready, stopping, or
//! why it failed.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket
//! named by `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
//! std's `UnixDatagram` speaks it; no libsystemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where to send notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    target: Target,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notify {
    /// From `NOTIFY_SOCKET`; `None` when it is unset or empty. An address
    /// of a kind we cannot use (vsock) is logged and ignored.
    pub fn from_env() -> Option<Notify> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let notify = Notify::parse(value.as_encoded_bytes());
        if notify.is_none() && !value.is_empty() {
            tracing::warn!(socket = ?value, "NOTIFY_SOCKET is neither a path nor an @abstract name; not notifying");
        }
        notify
    }

    fn parse(value: &[u8]) -> Option<Notify> {
        let target = match value {
            [b'@', name @ ..] => Target::Abstract(name.to_vec()),
            [b'/', ..] => {
                use std::os::unix::ffi::OsStrExt;
                Target::Path(PathBuf::from(std::ffi::OsStr::from_bytes(value)))
            }
            _ => return None,
        };
        Some(Notify { target })
    }

    /// A notifier for a socket at `path` (the tests'; the mount takes
    /// `NOTIFY_SOCKET`).
    #[cfg(test)]
    fn path(path: impl Into<PathBuf>) -> Notify {
        Notify {
            target: Target::Path(path.into()),
        }
    }

    /// Sends `message` (`KEY=VALUE` lines). Failures are logged, never
    /// fatal: a supervisor that went away (the parent of `--background`
    /// once the mount was ready) must not stop the mount.
    fn send(&self, message: &str, important: bool) {
        if let Err(error) = self.try_send(message) {
            if important {
                tracing::warn!(%error, "cannot notify the supervisor (NOTIFY_SOCKET)");
            } else {
                tracing::debug!(%error, "cannot notify the supervisor (NOTIFY_SOCKET)");
            }
        }
    }

    fn try_send(&self, message: &str) -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let addr = match &self.target {
            Target::Path(p) => SocketAddr::from_pathname(p)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
        };
        socket.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    }

    /// `READY=1` with a one-line status.
    pub fn ready(&self, status: &str) {
        self.send(
            &format!(
                "READY=1\nSTATUS={}\nMAINPID={}\n",
                one_line(status),
                std::process::id()
            ),
            true,
        );
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=unmounting\n", false);
    }

    /// Why the mount is about to exit without having become ready (or
    /// after): systemd shows it in `systemctl status`, `--background`
    /// prints it. No `ERRNO=`: there is no errno behind most reasons, and
    /// systemd would show `ERRNO=1` as "Operation not permitted".
    pub fn failed(&self, reason: &str) {
        self.send(&format!("STATUS=failed: {}\n", one_line(reason)), true);
    }
}

/// A message is lines of KEY=VALUE: a value holds no newline.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Notify::parse(b"/run/systemd/notify"),
            Some(Notify::path("/run/systemd/notify"))
        );
        assert_eq!(
            Notify::parse(b"@sd-notify"),
            Some(Notify {
                target: Target::Abstract(b"sd-notify".to_vec())
            })
        );
        assert_eq!(Notify::parse(b"vsock:2:1234"), None);
        assert_eq!(Notify::parse(b""), None);
    }

    #[test]
    fn sends_datagrams_to_a_path_and_an_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        Notify::path(&path).ready("mounted at /x\nwith 2 secrets");
        let mut buf = [0u8; 512];
        let n = rx.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            text.starts_with("READY=1\nSTATUS=mounted at /x with 2 secrets\nMAINPID="),
            "{text}"
        );

        use std::os::linux::net::SocketAddrExt;
        let name = format!("secretfs-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        Notify::parse(format!("@{name}").as_bytes())
            .unwrap()
            .stopping();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=unmounting\n");
    }
}
