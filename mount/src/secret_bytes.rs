//! A buffer for secret content that stays out of swap and core dumps and is
//! wiped when dropped.
//!
//! Each buffer gets its own page-aligned, page-rounded allocation. `mlock`
//! does not nest: unlocking a page unlocks it for every buffer that shares
//! it, so two small secrets sharing a page would leave the survivor
//! swappable once the other is dropped. One page per secret costs a few KiB
//! and avoids that.

use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// Logged at most once per process: a refused `mlock` is a host setting, and
/// repeating it for every secret would drown the log.
static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Secret bytes in locked memory. Never derives `Debug`, `Clone` or
/// `Serialize`; share it with `Arc`.
pub struct SecretBytes {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    locked: bool,
}

// SAFETY: the buffer is owned exclusively and never mutated after
// construction (until drop), so sharing `&SecretBytes` across threads is sound.
unsafe impl Send for SecretBytes {}
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// Copies `data` into a fresh locked buffer. The caller still owns (and
    /// should wipe) `data`.
    pub fn copy_from(data: &[u8]) -> SecretBytes {
        let page = page_size();
        // At least one page, so an empty secret still has a valid allocation.
        let size = data.len().max(1).div_ceil(page) * page;
        let layout = Layout::from_size_align(size, page).expect("page-aligned layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        // SAFETY: `ptr` points to `size >= data.len()` writable bytes that
        // cannot overlap `data` (fresh allocation).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
        let locked = lock(ptr, size);
        SecretBytes {
            ptr,
            len: data.len(),
            layout,
            locked,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` initialised bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

// Only the length: enough to debug, nothing to leak.
impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.len)
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        // SAFETY: we own the whole allocation; wipe all of it, then unlock.
        let whole =
            unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) };
        whole.zeroize();
        if self.locked {
            // SAFETY: same range that was locked.
            unsafe { libc::munlock(self.ptr.as_ptr().cast(), self.layout.size()) };
        }
        // SAFETY: allocated in `copy_from` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn lock(ptr: NonNull<u8>, size: usize) -> bool {
    // SAFETY: the range is a live allocation we own.
    let rc = unsafe { libc::mlock(ptr.as_ptr().cast(), size) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                error = %err,
                "cannot lock secret memory against swapping (mlock refused); secrets may reach swap. \
                 Raise RLIMIT_MEMLOCK (`ulimit -l`, or LimitMEMLOCK= in the systemd unit) \
                 or grant CAP_IPC_LOCK"
            );
        }
        return false;
    }
    // Keep secrets out of core dumps even if something re-enables dumping.
    // SAFETY: page-aligned range we own; advice only.
    unsafe { libc::madvise(ptr.as_ptr().cast(), size, libc::MADV_DONTDUMP) };
    true
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_a_copy() {
        let mut src = b"hunter2".to_vec();
        let s = SecretBytes::copy_from(&src);
        src.zeroize();
        assert_eq!(s.as_bytes(), b"hunter2");
        assert_eq!(s.len(), 7);
        assert_ne!(s.len(), 0);
        // Root (these tests' usual user) is not bound by RLIMIT_MEMLOCK.
        if unsafe { libc::geteuid() } == 0 {
            assert!(s.locked);
        }
    }

    #[test]
    fn empty_and_multi_page() {
        let e = SecretBytes::copy_from(b"");
        assert_eq!(e.len(), 0);
        assert_eq!(e.as_bytes(), b"");
        let big = vec![7u8; 10_000];
        let b = SecretBytes::copy_from(&big);
        assert_eq!(b.as_bytes(), &big[..]);
    }

    #[test]
    fn debug_redacts() {
        let s = SecretBytes::copy_from(b"topsecret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("topsecret"));
        assert!(shown.contains("9 bytes"));
    }
}
