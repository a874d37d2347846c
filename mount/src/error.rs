//! What `run` can fail with. Each message says what went wrong and what to
//! do about it, because it ends up in front of an operator as is.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    #[error(
        "secretfs_mount::run must be called inside a tokio multi-thread runtime \
         (use #[tokio::main] or Builder::new_multi_thread())"
    )]
    NoRuntime,

    #[error(
        "mountpoint {} does not exist: create it (mkdir -p {}, or pass --create-mountpoint) or choose another directory",
        .0.display(), .0.display()
    )]
    MountpointMissing(PathBuf),

    #[error("mountpoint {} is not a directory: give an empty directory", .0.display())]
    NotADirectory(PathBuf),

    #[error(
        "mountpoint {} is not empty: secretfs mounts only over an empty directory so that nothing \
         is hidden by accident; empty it or choose another directory", .0.display()
    )]
    NotEmpty(PathBuf),

    #[error(
        "{} is already served by a running secretfs mount: stop that mount first, or choose another directory",
        .0.display()
    )]
    AlreadyMounted(PathBuf),

    #[error("cannot use mountpoint {}: {source}", path.display())]
    Mountpoint { path: PathBuf, source: io::Error },

    #[error(
        "cannot clear the stale mount left at {} by an earlier crash: {source}; \
         run `umount -l {}` as root and try again", path.display(), path.display()
    )]
    StaleMount { path: PathBuf, source: io::Error },

    /// Bad server address or unusable CA/certificate/key PEM.
    #[error("cannot set up the connection: {0}; check the server address and the --ca, --cert and --key files")]
    Connect(String),

    #[error(
        "TLS with the server at {server} failed: {reason}. Check the CA (--ca), the client \
         certificate and key (--cert/--key), and that the certificate was issued by this server's CA"
    )]
    TlsRefused { server: String, reason: String },

    #[error(
        "the server at {server} does not accept this client: {message}. The client may be unknown, \
         disabled or removed: ask an operator to check it, or issue a new certificate"
    )]
    ClientRefused { server: String, message: String },

    #[error(
        "could not sync with the server at {server} within {timeout}: {reason}. Nothing was mounted; \
         check that the server is running and reachable at that address, or raise the start timeout"
    )]
    StartTimeout {
        server: String,
        timeout: String,
        reason: String,
    },

    #[error("{0}")]
    CallerRule(String),

    #[error("FUSE is not available: {0}")]
    FuseUnavailable(String),

    #[error("{0}")]
    Privileges(#[from] crate::privileges::PrivilegeError),

    #[error("cannot mount at {}: {source}", path.display())]
    Mount { path: PathBuf, source: io::Error },
}
