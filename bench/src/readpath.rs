//! File-system loops with raw system calls (through rustix), as a C
//! program would make them: one open, one read, one close per file, no
//! buffering: the measurement is the filesystem, not std's wrappers.

use std::ffi::{CStr, CString};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rustix::fs::{open, statat, AtFlags, Dir, Mode, OFlags};

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in paths")
}

/// `iterations` × open+read+close of `path`, which must hold `expect` bytes.
pub fn open_read_close(path: &Path, iterations: u32, expect: usize) -> Result<Duration> {
    let c = cpath(path);
    let mut buf = vec![0u8; expect + 4096];
    let start = Instant::now();
    for _ in 0..iterations {
        let fd = match open(c.as_c_str(), OFlags::RDONLY, Mode::empty()) {
            Ok(fd) => fd,
            Err(e) => bail!("open {}: {}", path.display(), std::io::Error::from(e)),
        };
        let n = rustix::io::read(&fd, &mut buf);
        drop(fd);
        match n {
            Ok(n) if n == expect => {}
            Ok(n) => bail!("read {} returned {n}, expected {expect}", path.display()),
            Err(e) => bail!("read {}: {}", path.display(), std::io::Error::from(e)),
        }
    }
    Ok(start.elapsed())
}

/// One open+read+close; the bytes read, or None when the open or the read
/// fails.
pub fn read_once(c: &CStr, buf: &mut [u8]) -> Option<usize> {
    let fd = open(c, OFlags::RDONLY, Mode::empty()).ok()?;
    rustix::io::read(&fd, buf).ok()
}

pub fn c_path(path: &Path) -> CString {
    cpath(path)
}

/// `iterations` × (opendir, readdir to the end, fstatat every entry,
/// closedir); every pass must see `expect` entries besides `.` and `..`.
pub fn list_and_stat(dir: &Path, iterations: u32, expect: usize) -> Result<Duration> {
    let c = cpath(dir);
    let io = |what: &str, e: rustix::io::Errno| {
        anyhow::anyhow!("{what} {}: {}", dir.display(), std::io::Error::from(e))
    };
    let start = Instant::now();
    for _ in 0..iterations {
        let mut seen = 0;
        // The flags glibc's opendir uses.
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = open(c.as_c_str(), flags, Mode::empty()).map_err(|e| io("opendir", e))?;
        let mut entries = Dir::new(fd).map_err(|e| io("opendir", e))?;
        while let Some(entry) = entries.read() {
            let entry = entry.map_err(|e| io("readdir", e))?;
            let name = entry.file_name();
            if name.to_bytes().first() == Some(&b'.') {
                continue;
            }
            let dirfd = entries.fd().map_err(|e| io("dirfd", e))?;
            statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io("stat in", e))?;
            seen += 1;
        }
        drop(entries);
        if seen != expect {
            bail!("{} listed {seen} entries, expected {expect}", dir.display());
        }
    }
    Ok(start.elapsed())
}

pub fn per_op_us(d: Duration, n: u32) -> f64 {
    d.as_secs_f64() * 1e6 / f64::from(n)
}

/// Alternates `a` and `b` for `rounds` rounds (so drift on a shared
/// machine hits both) and returns the best per-op time of each, in µs.
pub fn best_alternating(
    rounds: u32,
    iterations: u32,
    mut a: impl FnMut(u32) -> Result<Duration>,
    mut b: impl FnMut(u32) -> Result<Duration>,
) -> Result<(f64, f64)> {
    // Warm both: dentries, attributes, pages.
    a(iterations / 10 + 1)?;
    b(iterations / 10 + 1)?;
    let (mut best_a, mut best_b) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..rounds {
        best_a = best_a.min(per_op_us(a(iterations)?, iterations));
        best_b = best_b.min(per_op_us(b(iterations)?, iterations));
    }
    Ok((best_a, best_b))
}
