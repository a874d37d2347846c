//! What the server process does to keep secrets in memory out of reach:
//! not dumpable (no core file, no ptrace by same-uid processes), and, when
//! the host allows it, all of its memory locked against swap.

/// Makes the process non-dumpable and locks its memory. Called before the
/// master key is read, so no copy of it is ever swappable.
pub fn protect_process() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot make the server non-dumpable");
    }
    if !may_lock_unbounded() {
        tracing::warn!(
            "cannot lock the server's memory against swap: secrets and keys may reach swap. \
             Give the server CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK (the shipped systemd unit does), \
             or run it on a host without swap"
        );
        return;
    }
    // MCL_ONFAULT: lock pages as they are used, rather than faulting in
    // every thread stack and arena at once.
    // SAFETY: mlockall takes flags only.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lock the server's memory against swap; secrets may reach swap");
    }
}

/// Locking all future memory is safe only when the lock limit cannot be
/// hit (it would make allocations fail later): CAP_IPC_LOCK or no limit.
fn may_lock_unbounded() -> bool {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0
        && limit.rlim_cur == libc::RLIM_INFINITY;
    unlimited || has_ipc_lock()
}

fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_is_not_dumpable_afterwards() {
        super::protect_process();
        // SAFETY: PR_GET_DUMPABLE takes no pointer.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) }, 0);
    }
}
