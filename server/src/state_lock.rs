//! One server at a time on a state directory.
//!
//! Two `server run` processes on one SQLite state directory would each
//! cache clients and access, publish changes only to their own watchers,
//! and keep their own audit chain head: the second must not start. `server
//! run` holds an exclusive `flock` on `DIR/lock` for as long as it runs;
//! the kernel drops it when the process ends, however it ends, so there is
//! nothing stale to clean up. The file holds the holder's pid, for the
//! message the next one prints.
//!
//! `server init` refuses a directory that is locked. The offline
//! certificate commands (`server admin-cert`, `server reissue-cert`) do not
//! take the lock: they are meant to work beside a running server.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

use crate::error::Error;
use crate::state_dir::StateDir;

/// The lock, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    /// `None` on a read-only filesystem without a lock file: no server can
    /// write there, and opening the database says so.
    _file: Option<File>,
}

/// Opens without following a symlink planted in the directory.
fn open(path: &Path, write: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .create(write)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(64).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

fn in_use(dir: &StateDir, pid: Option<u32>) -> String {
    let by = match pid {
        Some(pid) => format!("another secretfs server (pid {pid})"),
        None => "another secretfs server".to_owned(),
    };
    format!(
        "the state directory {} is in use by {by}, which holds {}; one server at a time may use a \
         state directory. Stop that server first, or give this one its own state directory \
         (`secretfs server init --state-dir NEW`)",
        dir.path.display(),
        dir.lock_file().display()
    )
}

impl StateLock {
    /// Takes the lock on `dir`, or says who holds it.
    pub fn acquire(dir: &StateDir) -> Result<StateLock, Error> {
        let path = dir.lock_file();
        let writable = open(&path, true);
        let read_only =
            matches!(&writable, Err(e) if e.raw_os_error() == Some(Errno::ROFS.raw_os_error()));
        let opened = if read_only {
            open(&path, false)
        } else {
            writable
        };
        let mut file = match opened {
            Ok(file) => file,
            Err(_) if read_only => return Ok(StateLock { _file: None }),
            Err(e) => {
                return Err(Error::io(
                    format!(
                        "cannot open the lock file {} (the state directory and its files must belong to the user the server runs as)",
                        path.display()
                    ),
                    e,
                ))
            }
        };
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(Errno::WOULDBLOCK) => {
                return Err(Error::Config(in_use(dir, read_pid(&mut file))));
            }
            Err(e) => {
                return Err(Error::io(
                    format!("cannot lock {}", path.display()),
                    e.into(),
                ))
            }
        }
        if !read_only {
            let pid = format!("{}\n", std::process::id());
            file.set_len(0)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(pid.as_bytes()))
                .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))?;
        }
        Ok(StateLock { _file: Some(file) })
    }

    /// Refuses when a server holds `dir`'s lock (for `server init`).
    pub fn check_unlocked(dir: &StateDir) -> Result<(), Error> {
        let Ok(mut file) = open(&dir.lock_file(), false) else {
            return Ok(());
        };
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Err(Errno::WOULDBLOCK) => Err(Error::Config(in_use(dir, read_pid(&mut file)))),
            // Taken (and dropped with the file) or not lockable: nobody
            // holds it that we can tell.
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path());
        StateLock::check_unlocked(&dir).unwrap();
        let held = StateLock::acquire(&dir).unwrap();
        // flock locks belong to the open file: a second open in this
        // process conflicts as another process's would.
        let err = StateLock::acquire(&dir).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert!(err.contains("Stop that server"), "{err}");
        let err = StateLock::check_unlocked(&dir).unwrap_err().to_string();
        assert!(err.contains("in use"), "{err}");
        drop(held);
        StateLock::check_unlocked(&dir).unwrap();
        let again = StateLock::acquire(&dir).unwrap();
        drop(again);
    }
}
