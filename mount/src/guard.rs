//! The caller check at the FUSE boundary: which requests it applies to,
//! the refusal counters for `.secretfs/status`, and the outbox of refusals
//! reported to the server's audit log.
//!
//! With a guard, the kernel must ask us on every lookup and open: the
//! adapter turns off no-open and gives names and attributes a zero TTL (a
//! cached entry would let any process resolve it without us). File pages
//! stay cached: an inode's bytes never change, and reaching them takes an
//! open, which is checked.

use std::sync::Mutex;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::caller::{CallerPolicy, Denial};
use crate::tree::{CONTROL_INO, ROOT_INO, STATUS_INO};

/// Refusals kept for the next report; more are counted but not itemised.
const OUTBOX_MAX: usize = 1000;

pub struct Guard {
    policy: CallerPolicy,
    refusals: Refusals,
    /// The status folder and file skip the check (`--public-status`).
    public_status: bool,
    outbox: Mutex<Vec<Refusal>>,
}

/// One refused request: the last one shows in `.secretfs/status`, each is
/// reported to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    /// Shown in the status in RFC 3339 UTC, like every time there.
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub pid: u32,
    pub uid: u32,
    /// The deciding cgroup path, when it was read.
    pub cgroup: Option<String>,
    /// What was asked for: a name or inode, never content. For the audit
    /// log only: the status says who was refused, not what they tried.
    #[serde(skip)]
    pub path: String,
    pub reason: String,
}

impl Refusal {
    /// `denial` of a request by `uid` for `path`, now.
    pub fn new(denial: &Denial, uid: u32, path: String) -> Refusal {
        Refusal {
            at: SystemTime::now(),
            pid: denial.pid,
            uid,
            cgroup: denial.cgroup.clone(),
            path,
            reason: denial.reason.to_string(),
        }
    }
}

fn rfc3339<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&secretfs_proto::cert::rfc3339(*at))
}

/// Refusals, for `.secretfs/status`.
#[derive(Debug, Default)]
pub struct Refusals {
    inner: Mutex<RefusalCounts>,
}

/// What `.secretfs/status` shows under `"refused"`.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct RefusalCounts {
    pub count: u64,
    pub last: Option<Refusal>,
}

impl Refusals {
    pub fn record(&self, refusal: Refusal) {
        let mut counts = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        counts.count += 1;
        counts.last = Some(refusal);
    }

    pub fn snapshot(&self) -> RefusalCounts {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Guard {
    pub fn new(policy: CallerPolicy, public_status: bool) -> Guard {
        Guard {
            policy,
            refusals: Refusals::default(),
            public_status,
            outbox: Mutex::new(Vec::new()),
        }
    }

    /// Whether a request on `ino` skips the check: the mount's root (the
    /// kernel needs its attributes to walk into the mount at all) and, with
    /// `--public-status`, the status folder and file. By default they are
    /// checked: the status lists the secrets' names, which a refused host
    /// user has no business reading.
    fn exempt(&self, ino: u64) -> bool {
        ino == ROOT_INO || (self.public_status && (ino == CONTROL_INO || ino == STATUS_INO))
    }

    /// Checks the calling process for a request on `ino`. `what` describes
    /// the request for the audit log (a name, never content).
    pub fn admit(&self, ino: u64, pid: u32, uid: u32, what: impl FnOnce() -> String) -> bool {
        if self.exempt(ino) {
            return true;
        }
        match self.policy.check(pid) {
            Ok(_) => true,
            Err(denial) => {
                let refusal = Refusal::new(&denial, uid, what());
                let mut outbox = self.outbox.lock().unwrap_or_else(|e| e.into_inner());
                if outbox.len() < OUTBOX_MAX {
                    outbox.push(refusal.clone());
                }
                drop(outbox);
                self.refusals.record(refusal);
                false
            }
        }
    }

    /// A lookup of `name` in `parent`: the name's own inode is not known
    /// yet, so the status entries are recognised by their place.
    pub fn admit_lookup(&self, parent: u64, name: &str, pid: u32, uid: u32) -> bool {
        let target = match (parent, name) {
            (ROOT_INO, crate::tree::CONTROL_DIR) => CONTROL_INO,
            (CONTROL_INO, crate::tree::STATUS_FILE) => STATUS_INO,
            // Any other name is checked (u64::MAX is never exempt).
            _ => u64::MAX,
        };
        self.admit(target, pid, uid, || name.to_owned())
    }

    pub fn counts(&self) -> RefusalCounts {
        self.refusals.snapshot()
    }

    /// Takes the refusals not yet reported.
    pub fn take_outbox(&self) -> Vec<Refusal> {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::DenyReason;

    fn guard(public_status: bool) -> Guard {
        // A fixture /proc with no processes: every check fails.
        let proc = tempfile::tempdir().unwrap();
        let policy =
            CallerPolicy::with_roots(vec!["web".into()], vec![], proc.path(), proc.path()).unwrap();
        std::mem::forget(proc);
        Guard::new(policy, public_status)
    }

    #[test]
    fn root_is_exempt_and_status_only_when_public() {
        let g = guard(true);
        assert!(g.admit(ROOT_INO, 42, 0, String::new));
        assert!(g.admit_lookup(ROOT_INO, ".secretfs", 42, 0));
        assert!(g.admit_lookup(CONTROL_INO, "status", 42, 0));
        assert!(g.admit(STATUS_INO, 42, 0, String::new));
        assert!(!g.admit_lookup(ROOT_INO, "db", 42, 0));
        assert!(!g.admit(10, 42, 1000, || "inode 10".into()));
        assert_eq!(g.counts().count, 2);
        let out = g.take_outbox();
        assert_eq!(
            out.iter().map(|r| r.path.as_str()).collect::<Vec<_>>(),
            ["db", "inode 10"]
        );
        assert_eq!(out[1].uid, 1000);
        assert!(g.take_outbox().is_empty());

        // The default: the status names secrets, so it is checked too.
        let strict = guard(false);
        assert!(strict.admit(ROOT_INO, 42, 0, String::new));
        assert!(!strict.admit_lookup(ROOT_INO, ".secretfs", 42, 0));
        assert!(!strict.admit(STATUS_INO, 42, 0, String::new));
    }

    #[test]
    fn pid_zero_is_refused() {
        let g = guard(false);
        assert!(!g.admit(10, 0, 0, String::new));
        assert!(g.counts().last.unwrap().reason.contains("pid 0"));
    }

    #[test]
    fn refusals_are_counted_with_the_last_one() {
        let r = Refusals::default();
        assert_eq!(r.snapshot(), RefusalCounts::default());
        let denial = |pid| Denial {
            pid,
            reason: DenyReason::NotAllowed,
            cgroup: Some("/docker/x".into()),
        };
        r.record(Refusal::new(&denial(5), 1000, "a".into()));
        r.record(Refusal::new(&denial(6), 0, "b".into()));
        let s = r.snapshot();
        assert_eq!(s.count, 2);
        let last = s.last.unwrap();
        assert_eq!((last.pid, last.uid), (6, 0));
        assert_eq!(last.cgroup.as_deref(), Some("/docker/x"));
        let json = serde_json::to_value(r.snapshot()).unwrap();
        assert_eq!(json["count"], 2);
        assert_eq!(
            json["last"]["reason"],
            "caller is not in the mount's container"
        );
    }
}
