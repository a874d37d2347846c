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

use rustix::mm::Advice;
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
// construction (until drop), so moving a `SecretBytes` to another thread is sound.
unsafe impl Send for SecretBytes {}
// SAFETY: as above: after construction it is only read, so sharing
// `&SecretBytes` across threads is sound.
unsafe impl Sync for SecretBytes {}

impl SecretBytes {
    /// Copies `data` into a fresh locked buffer. The caller still owns (and
    /// should wipe) `data`.
    pub fn copy_from(data: &[u8]) -> SecretBytes {
        SecretBytes::copy_with(data, lock)
    }

    /// As [`SecretBytes::copy_from`], locking with `lock` (tests make it fail).
    fn copy_with(data: &[u8], lock: impl FnOnce(NonNull<u8>, usize) -> bool) -> SecretBytes {
        let page = page_size();
        // At least one page, so an empty secret still has a valid allocation.
        let size = data.len().max(1).div_ceil(page) * page;
        let layout = Layout::from_size_align(size, page).expect("page-aligned layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout);
        };
        // Before the first secret byte lands: out of core dumps whether or
        // not mlock is allowed, then locked, so no byte is ever in a page
        // that could be swapped or dumped.
        dont_dump(ptr, size);
        let locked = lock(ptr, size);
        // SAFETY: `ptr` points to `size >= data.len()` writable bytes that
        // cannot overlap `data` (fresh allocation).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr.as_ptr(), data.len()) };
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
            // SAFETY: same range that was locked, still ours until the
            // dealloc below.
            let _ = unsafe { rustix::mm::munlock(self.ptr.as_ptr().cast(), self.layout.size()) };
        }
        // SAFETY: allocated in `copy_from` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

fn lock(ptr: NonNull<u8>, size: usize) -> bool {
    // SAFETY: the range is a live allocation we own; mlock only pins it.
    if let Err(err) = unsafe { rustix::mm::mlock(ptr.as_ptr().cast(), size) } {
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
    true
}

/// Keeps the range out of core dumps even if something re-enables dumping
/// (the process is non-dumpable, see `forbid_core_dumps`).
fn dont_dump(ptr: NonNull<u8>, size: usize) {
    // SAFETY: page-aligned range we own; this advice changes no contents.
    let advised = unsafe { rustix::mm::madvise(ptr.as_ptr().cast(), size, Advice::LinuxDontDump) };
    if let Err(error) = advised {
        tracing::debug!(%error, "madvise(MADV_DONTDUMP) refused");
    }
}

fn page_size() -> usize {
    rustix::param::page_size()
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
        if rustix::process::geteuid().is_root() {
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

    /// The `VmFlags` of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split(' ').next().unwrap_or("");
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = (lo..hi).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_owned();
                }
            }
        }
        panic!("no mapping holds {addr:#x} in /proc/self/smaps");
    }

    #[test]
    fn out_of_core_dumps_even_when_mlock_fails() {
        // Review finding 10: MADV_DONTDUMP was only applied after a
        // successful mlock.
        let s = SecretBytes::copy_with(&[7u8; 5000], |ptr, size| {
            // And nothing is copied in before the lock is tried.
            // SAFETY: the allocation being built, `size` bytes long.
            let page = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), size) };
            assert!(page.iter().all(|&b| b == 0), "secret copied before locking");
            false
        });
        assert!(!s.locked);
        assert_eq!(s.as_bytes(), &[7u8; 5000][..]);
        let flags = vm_flags(s.ptr.as_ptr() as usize);
        assert!(
            flags.split_ascii_whitespace().any(|f| f == "dd"),
            "no `dd` (MADV_DONTDUMP) on the secret's mapping: {flags}"
        );
        // And on the ordinary path too.
        let s = SecretBytes::copy_from(b"x");
        let flags = vm_flags(s.ptr.as_ptr() as usize);
        assert!(flags.split_ascii_whitespace().any(|f| f == "dd"), "{flags}");
    }

    #[test]
    fn debug_redacts() {
        let s = SecretBytes::copy_from(b"topsecret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("topsecret"));
        assert!(shown.contains("9 bytes"));
    }
}
