//! What the server process does to keep secrets in memory out of reach:
//! not dumpable (no core file, no ptrace by same-uid processes), and, when
//! the host allows it, all of its memory locked against swap.

use rustix::mm::MlockAllFlags;
use rustix::process as prctl;

/// Makes the process non-dumpable and locks its memory. Called before the
/// master key is read, so no copy of it is ever swappable.
pub fn protect_process() {
    not_dumpable();
    lock_memory();
}

/// No core file, no ptrace by same-uid processes.
fn not_dumpable() {
    if let Err(e) = prctl::set_dumpable_behavior(prctl::DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %std::io::Error::from(e), "cannot make the server non-dumpable");
    }
}

/// All memory, present and future, locked against swap, when the host
/// allows it without a limit.
fn lock_memory() {
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
    let flags = MlockAllFlags::CURRENT | MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT;
    if let Err(e) = rustix::mm::mlockall(flags) {
        tracing::warn!(error = %std::io::Error::from(e), "cannot lock the server's memory against swap; secrets may reach swap");
    }
}

/// Locking all future memory is safe only when the lock limit cannot be
/// hit (it would make allocations fail later): CAP_IPC_LOCK or no limit.
fn may_lock_unbounded() -> bool {
    // `None` is RLIM_INFINITY.
    let unlimited = prctl::getrlimit(prctl::Resource::Memlock).current.is_none();
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
    // Only the dumpable flag: locking memory (as root, mlockall with
    // FUTURE) would apply to the whole test binary.
    #[test]
    fn the_process_is_not_dumpable_afterwards() {
        super::not_dumpable();
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
    }
}
