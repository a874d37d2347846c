//! File-system loops with plain libc calls, as a C program would make them:
//! the measurement is the filesystem, not std's wrappers.

use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

fn cpath(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("no NUL in paths")
}

/// `iterations` × open+read+close of `path`, which must hold `expect` bytes.
pub fn open_read_close(path: &Path, iterations: u32, expect: usize) -> Result<Duration> {
    let c = cpath(path);
    let mut buf = vec![0u8; expect + 4096];
    let start = Instant::now();
    for _ in 0..iterations {
        // SAFETY: valid path and buffer.
        let n = unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                bail!(
                    "open {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            n
        };
        if n != expect as isize {
            bail!("read {} returned {n}, expected {expect}", path.display());
        }
    }
    Ok(start.elapsed())
}

/// One open+read+close; the bytes read, or None when the open fails.
pub fn read_once(c: &CString, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: valid path and buffer.
    unsafe {
        let fd = libc::open(c.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        usize::try_from(n).ok()
    }
}

pub fn c_path(path: &Path) -> CString {
    cpath(path)
}

/// `iterations` × (opendir, readdir to the end, fstatat every entry,
/// closedir); every pass must see `expect` entries besides `.` and `..`.
pub fn list_and_stat(dir: &Path, iterations: u32, expect: usize) -> Result<Duration> {
    let c = cpath(dir);
    let start = Instant::now();
    for _ in 0..iterations {
        let mut seen = 0;
        // SAFETY: valid path; the entry names are NUL-terminated by the kernel.
        unsafe {
            let d = libc::opendir(c.as_ptr());
            if d.is_null() {
                bail!(
                    "opendir {}: {}",
                    dir.display(),
                    std::io::Error::last_os_error()
                );
            }
            let fd = libc::dirfd(d);
            loop {
                let e = libc::readdir(d);
                if e.is_null() {
                    break;
                }
                let name = (*e).d_name.as_ptr();
                if *name == b'.' as libc::c_char {
                    continue;
                }
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstatat(fd, name, &mut st, libc::AT_SYMLINK_NOFOLLOW) != 0 {
                    libc::closedir(d);
                    bail!(
                        "stat in {}: {}",
                        dir.display(),
                        std::io::Error::last_os_error()
                    );
                }
                seen += 1;
            }
            libc::closedir(d);
        }
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
