//! Replacing certificate and key files safely, for every writer of them:
//! the mount's renewal, `client renew`, `server admin-cert` and
//! `server reissue-cert`.
//!
//! - [`replace_file`]: one file, whole or not at all: a new temporary file
//!   beside it (created exclusively, 0600, so nothing planted is followed
//!   or reused), chmod'ed to its final mode through the descriptor (the
//!   umask does not apply), written, fsynced, renamed over the file, and
//!   the directory fsynced (so the rename survives a crash).
//! - [`replace_pair`]: a certificate and its key. Both temporary files are
//!   written and fsynced first; then the two renames, back to back (key
//!   first); then one fsync of each directory. If the certificate's rename
//!   fails, the old key is put back (it was hard-linked aside before), so
//!   the files stay a working pair. Two renames are not one atomic step: a
//!   reader between them sees the new key with the old certificate, which
//!   is why every reader checks that a pair matches before using it.
//! - [`write_client_files`]: NAME.pem, NAME.key and ca.pem, as `client
//!   renew` and `server admin-cert` write them.
//! - [`remove_stale_temporaries`]: what a crash between writing and
//!   renaming left (temporary files hold key material).
//!
//! Temporary names: `.NAME.renew-PID` (and `.NAME.renew-PID.old` for the
//! old key kept aside), in the file's own directory.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of a new certificate file (an existing one keeps its mode).
pub const CERT_MODE: u32 = 0o644;
/// Mode of a key file, always.
pub const KEY_MODE: u32 = 0o600;

/// The mode a new certificate at `path` gets: that of the file it
/// replaces, else [`CERT_MODE`].
fn cert_mode(path: &Path) -> u32 {
    fs::metadata(path).map_or(CERT_MODE, |m| m.permissions().mode() & 0o777)
}

const TEMP_MARK: &str = ".renew-";

/// A file that could not be replaced.
#[derive(Debug, thiserror::Error)]
pub enum ReplaceError {
    /// Nothing was changed: the files are as they were.
    #[error("cannot write {}: {source}", .path.display())]
    Unchanged { path: PathBuf, source: io::Error },
    /// The files changed on disk since the caller read them (see
    /// [`replace_pair`]'s `still_current`); nothing was written.
    #[error("{} or {} changed on disk meanwhile; left as they are", .cert.display(), .key.display())]
    ChangedMeanwhile { cert: PathBuf, key: PathBuf },
    /// The new key is in place but the certificate could not be replaced,
    /// and the old key could not be put back: the two files do not match.
    /// The new certificate is left in `new_cert` (and the old key in
    /// `old_key`, when it could be kept aside), to finish by hand.
    #[error("cannot write {}: {source}; and the old key could not be put back in {} ({undo}): the key file no longer matches the certificate file; the new certificate is in {}{}", .cert.display(), .key.display(), .new_cert.display(), .old_key.as_ref().map(|p| format!(" and the old key in {}", p.display())).unwrap_or_default())]
    Mismatched {
        cert: PathBuf,
        key: PathBuf,
        source: io::Error,
        undo: io::Error,
        new_cert: PathBuf,
        old_key: Option<PathBuf>,
    },
}

impl ReplaceError {
    /// True when the files on disk are still the old, working ones.
    pub fn unchanged(&self) -> bool {
        !matches!(self, ReplaceError::Mismatched { .. })
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn temp_path(path: &Path, suffix: &str) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other("not a file path"))?;
    Ok(parent(path).join(format!(
        ".{}{TEMP_MARK}{}{suffix}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// A temporary file beside `path` holding `content` with `mode`, fsynced.
fn write_temp(path: &Path, content: &[u8], mode: u32) -> io::Result<PathBuf> {
    let tmp = temp_path(path, "")?;
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        // create_new: never follows or reuses whatever sits at that name;
        // 0600 until the content is complete, then the final mode
        // through the descriptor (the umask may have taken bits).
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// Replaces `path` with `content` (mode `mode`) whole or not at all.
pub fn replace_file(path: &Path, content: &[u8], mode: u32) -> Result<(), ReplaceError> {
    let unchanged = |source| ReplaceError::Unchanged {
        path: path.to_path_buf(),
        source,
    };
    let tmp = write_temp(path, content, mode).map_err(unchanged)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(unchanged(e));
    }
    // The rename happened; a failed directory sync only weakens what a
    // crash would keep.
    let _ = sync_dir(parent(path));
    Ok(())
}

/// Replaces a certificate and its key (see the module docs). The key is
/// 0600; the certificate keeps the mode it has (0644 when new).
/// `still_current` runs after both new files are written, right before the
/// renames: false leaves everything as it was ([`ReplaceError::ChangedMeanwhile`]),
/// for a writer that must not overwrite what someone else just wrote.
pub fn replace_pair(
    cert: &Path,
    cert_pem: &[u8],
    key: &Path,
    key_pem: &[u8],
    still_current: impl FnOnce() -> bool,
) -> Result<(), ReplaceError> {
    let cert_mode = cert_mode(cert);
    let key_existed = fs::symlink_metadata(key).is_ok();
    let key_tmp = write_temp(key, key_pem, KEY_MODE).map_err(|source| ReplaceError::Unchanged {
        path: key.to_path_buf(),
        source,
    })?;
    let mut temps = vec![key_tmp.clone()];
    let cleanup = |temps: &[PathBuf]| {
        for t in temps {
            let _ = fs::remove_file(t);
        }
    };
    let cert_tmp = match write_temp(cert, cert_pem, cert_mode) {
        Ok(t) => t,
        Err(source) => {
            cleanup(&temps);
            return Err(ReplaceError::Unchanged {
                path: cert.to_path_buf(),
                source,
            });
        }
    };
    temps.push(cert_tmp.clone());
    // The old key, kept aside (a second name for the same inode) to put it
    // back if the certificate cannot be replaced.
    let old_key = match temp_path(key, ".old") {
        Ok(p) => {
            let _ = fs::remove_file(&p);
            fs::hard_link(key, &p).ok().map(|()| p)
        }
        Err(_) => None,
    };
    if let Some(p) = &old_key {
        temps.push(p.clone());
    }
    if !still_current() {
        cleanup(&temps);
        return Err(ReplaceError::ChangedMeanwhile {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        });
    }
    if let Err(source) = fs::rename(&key_tmp, key) {
        cleanup(&temps);
        return Err(ReplaceError::Unchanged {
            path: key.to_path_buf(),
            source,
        });
    }
    if let Err(source) = fs::rename(&cert_tmp, cert) {
        let undo = match &old_key {
            Some(p) => fs::rename(p, key),
            // There was none: take the new one away again.
            None if !key_existed => fs::remove_file(key),
            None => Err(io::Error::other("the old key could not be kept aside")),
        };
        let _ = sync_dir(parent(key));
        return Err(match undo {
            Ok(()) => {
                cleanup(&temps);
                ReplaceError::Unchanged {
                    path: cert.to_path_buf(),
                    source,
                }
            }
            // Both halves are kept: the only copies of the new certificate
            // and of the old key.
            Err(undo) => ReplaceError::Mismatched {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
                undo,
                new_cert: cert_tmp,
                old_key,
            },
        });
    }
    if let Some(p) = &old_key {
        let _ = fs::remove_file(p);
    }
    let _ = sync_dir(parent(key));
    if parent(cert) != parent(key) {
        let _ = sync_dir(parent(cert));
    }
    Ok(())
}

/// Where a client's files go. `key: None` when the caller holds no key
/// (a certificate for a CSR); `ca: None` leaves the CA file alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientPaths {
    pub cert: PathBuf,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

impl ClientPaths {
    /// NAME.pem, NAME.key and ca.pem in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> ClientPaths {
        ClientPaths {
            cert: dir.join(format!("{name}.pem")),
            key: Some(dir.join(format!("{name}.key"))),
            ca: Some(dir.join("ca.pem")),
        }
    }
}

/// Writes a new certificate (with its key, when given) and the CA over
/// `paths`: the directories are made (0700) when missing, the pair is
/// replaced by [`replace_pair`] (or the certificate alone by
/// [`replace_file`]), and the CA file only when its content differs.
pub fn write_client_files(
    paths: &ClientPaths,
    cert_pem: &[u8],
    key_pem: Option<&[u8]>,
    ca_pem: &[u8],
) -> Result<(), ReplaceError> {
    use std::os::unix::fs::DirBuilderExt;
    let dirs = [Some(&paths.cert), paths.key.as_ref(), paths.ca.as_ref()];
    for dir in dirs.into_iter().flatten().map(|p| parent(p)) {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| ReplaceError::Unchanged {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
    }
    match (&paths.key, key_pem) {
        (Some(key), Some(key_pem)) => replace_pair(&paths.cert, cert_pem, key, key_pem, || true)?,
        _ => {
            replace_file(&paths.cert, cert_pem, cert_mode(&paths.cert))?;
        }
    }
    if let Some(ca) = &paths.ca {
        if fs::read(ca).ok().as_deref() != Some(ca_pem) {
            replace_file(ca, ca_pem, CERT_MODE)?;
        }
    }
    Ok(())
}

/// Removes the temporary files a writer of `path` left behind when it
/// crashed between writing and renaming (`.NAME.renew-PID*` in its
/// directory), unless that process still runs or the file belongs to
/// another user. Returns what was removed.
pub fn remove_stale_temporaries(path: &Path) -> Vec<PathBuf> {
    let Some(name) = path.file_name() else {
        return Vec::new();
    };
    let prefix = format!(".{}{TEMP_MARK}", name.to_string_lossy());
    let Ok(entries) = fs::read_dir(parent(path)) else {
        return Vec::new();
    };
    let euid = rustix::process::geteuid().as_raw();
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let live = !pid.is_empty()
            && (pid == std::process::id().to_string() || Path::new("/proc").join(&pid).exists());
        if live {
            continue;
        }
        // symlink_metadata: a link is not a temporary of ours either way.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if !meta.file_type().is_file() || meta.uid() != euid {
            continue;
        }
        if fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_pair_is_replaced_whole_with_private_key_modes() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("c.key");
        fs::write(&cert, b"old cert").unwrap();
        fs::set_permissions(&cert, fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(&key, b"old key").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        replace_pair(&cert, b"new cert", &key, b"new key", || true).unwrap();
        assert_eq!(fs::read(&cert).unwrap(), b"new cert");
        assert_eq!(fs::read(&key).unwrap(), b"new key");
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o640, "the certificate keeps its mode");
        assert_eq!(names(dir.path()), ["c.key", "c.pem"], "no temporary left");
    }

    #[test]
    fn a_failed_certificate_rename_puts_the_old_key_back() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("c.key");
        fs::write(&key, b"old key").unwrap();
        // A non-empty directory where the certificate goes: its temporary
        // file is written, its rename fails (after the key's).
        let cert = dir.path().join("c.pem");
        fs::create_dir(&cert).unwrap();
        fs::write(cert.join("x"), b"").unwrap();
        let err = replace_pair(&cert, b"new cert", &key, b"new key", || true).unwrap_err();
        assert!(err.unchanged(), "{err}");
        assert!(err.to_string().contains("c.pem"), "{err}");
        assert_eq!(fs::read(&key).unwrap(), b"old key", "the old key is back");
        assert_eq!(names(dir.path()), ["c.key", "c.pem"], "no temporary left");

        // No key before: none after.
        fs::remove_file(&key).unwrap();
        let err = replace_pair(&cert, b"new cert", &key, b"new key", || true).unwrap_err();
        assert!(err.unchanged(), "{err}");
        assert!(!key.exists());
        assert_eq!(names(dir.path()), ["c.pem"], "no temporary left");
    }

    #[test]
    fn nothing_is_written_when_the_files_changed_meanwhile_or_cannot_be() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("c.key");
        fs::write(&cert, b"old cert").unwrap();
        fs::write(&key, b"old key").unwrap();
        let err = replace_pair(&cert, b"new cert", &key, b"new key", || false).unwrap_err();
        assert!(
            matches!(err, ReplaceError::ChangedMeanwhile { .. }),
            "{err}"
        );
        assert_eq!(fs::read(&key).unwrap(), b"old key");
        assert_eq!(fs::read(&cert).unwrap(), b"old cert");
        let elsewhere = dir.path().join("missing/c.pem");
        let err = replace_pair(&elsewhere, b"x", &key, b"y", || true).unwrap_err();
        assert!(err.unchanged());
        assert_eq!(fs::read(&key).unwrap(), b"old key");
        assert_eq!(names(dir.path()), ["c.key", "c.pem"], "no temporary left");
    }

    #[test]
    fn client_files_and_stale_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let paths = ClientPaths::in_dir(&out, "web");
        write_client_files(&paths, b"cert", Some(b"key"), b"ca").unwrap();
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(paths.key.as_ref().unwrap()), 0o600);
        assert_eq!(mode(&paths.cert), 0o644);
        assert_eq!(fs::read(paths.ca.as_ref().unwrap()).unwrap(), b"ca");
        // A certificate for a CSR: the key file is not touched.
        let no_key = ClientPaths {
            key: None,
            ..paths.clone()
        };
        write_client_files(&no_key, b"cert2", None, b"ca").unwrap();
        assert_eq!(fs::read(paths.key.as_ref().unwrap()).unwrap(), b"key");
        assert_eq!(fs::read(&paths.cert).unwrap(), b"cert2");

        // A crash left temporaries: a dead writer's go, a live one's stay.
        let dead = out.join(".web.key.renew-999999999");
        let dead_old = out.join(".web.key.renew-999999999.old");
        let live = out.join(format!(".web.key.renew-{}", std::process::id()));
        let other = out.join(".other.key.renew-999999999");
        for p in [&dead, &dead_old, &live, &other] {
            fs::write(p, b"secret").unwrap();
        }
        let mut removed = remove_stale_temporaries(paths.key.as_ref().unwrap());
        removed.sort();
        assert_eq!(removed, [dead.clone(), dead_old.clone()]);
        assert!(live.exists() && other.exists());
    }
}
