//! Connections: one writer with group commit, and reader connections that
//! never wait for it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use rusqlite::{Connection, TransactionBehavior};

use crate::store::{Result, StoreError};

/// Reader connections: a couple per core is plenty on this workload.
pub(super) const READERS: usize = 4;

pub(super) struct Connections {
    /// The one connection that writes (SQLite has one writer at a time).
    writer: Mutex<Connection>,
    /// Connections for reads: in WAL mode readers never wait for the
    /// writer, so a read is not queued behind a commit's fsync. Empty for an
    /// in-memory store (one connection is the whole database).
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    /// Group commit of writes (file stores only; see `write`).
    group: Mutex<GroupCommit>,
    committed: Condvar,
    /// Writers waiting for the connection: while there are any, a writer
    /// leaves the transaction open for them instead of committing.
    waiting: AtomicUsize,
    /// Run at the end of every write job, in its transaction (the audit
    /// chain and the row set: see `SqliteStore::with`).
    after_job: Option<AfterJob>,
}

pub(super) type AfterJob = Box<dyn Fn(&Connection) -> Result<()> + Send + Sync>;

#[derive(Default)]
struct GroupCommit {
    /// A transaction is open on the writer connection.
    open: bool,
    /// Bumped by every commit; a writer waits for the one after its job.
    epoch: u64,
    /// Epochs whose commit failed, with why (rare; pruned).
    failed: std::collections::BTreeMap<u64, String>,
}

fn unpoison<T>(r: std::sync::LockResult<T>) -> T {
    // A panic while holding a lock cannot leave SQLite half-written
    // (transactions roll back), so a poisoned lock is usable.
    r.unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    pub(super) fn new(writer: Connection, readers: Vec<Connection>) -> Self {
        Connections {
            writer: Mutex::new(writer),
            readers: readers.into_iter().map(Mutex::new).collect(),
            next_reader: AtomicUsize::new(0),
            group: Mutex::new(GroupCommit::default()),
            committed: Condvar::new(),
            waiting: AtomicUsize::new(0),
            after_job: None,
        }
    }

    /// Sets the step every write job ends with, in the job's transaction.
    pub(super) fn after_job(&mut self, f: AfterJob) {
        self.after_job = Some(f);
    }

    /// A job, then the after-job step, on the writer connection.
    fn job<T>(&self, conn: &Connection, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let out = f(conn)?;
        if let Some(after) = &self.after_job {
            after(conn)?;
        }
        Ok(out)
    }

    pub(super) fn writer(&self) -> MutexGuard<'_, Connection> {
        unpoison(self.writer.lock())
    }

    #[cfg(test)]
    pub(super) fn readers(&self) -> usize {
        self.readers.len()
    }

    #[cfg(test)]
    pub(super) fn commits(&self) -> u64 {
        unpoison(self.group.lock()).epoch
    }

    /// Runs `f` in a write transaction and returns once it is durable.
    ///
    /// Group commit: a durable commit (an fsync) costs far more than the
    /// statements of one change, so writers that queue while one is working
    /// share its transaction. Each job runs in its own savepoint (a failing
    /// job rolls back alone); the last writer of a burst commits for all,
    /// and every writer returns only after the commit that covers its job.
    /// An in-memory store (tests) has one connection for reads and writes,
    /// so there each write commits at once.
    pub(super) fn write<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.readers.is_empty() {
            let mut conn = self.writer();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let out = self.job(&tx, f)?;
            tx.commit()?;
            return Ok(out);
        }
        self.waiting.fetch_add(1, SeqCst);
        let conn = self.writer();
        self.waiting.fetch_sub(1, SeqCst);
        let epoch = {
            let mut g = unpoison(self.group.lock());
            if !g.open {
                conn.execute_batch("BEGIN IMMEDIATE")?;
                g.open = true;
            }
            g.epoch
        };
        conn.execute_batch("SAVEPOINT job")?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.job(&conn, f)));
        let keep = matches!(out, Ok(Ok(_)));
        let closed = if keep {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Err(e) = closed {
            // The transaction is in an unknown state: end it for everyone.
            let _ = conn.execute_batch("ROLLBACK");
            self.finish(epoch, Some(e.to_string()));
            return Err(e.into());
        }
        if self.waiting.load(SeqCst) == 0 {
            let committed = conn.execute_batch("COMMIT");
            if committed.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            self.finish(epoch, committed.as_ref().err().map(|e| e.to_string()));
            drop(conn);
            committed?;
        } else {
            // Someone is waiting for the connection: it (or the last of the
            // burst) commits our job too.
            drop(conn);
            let mut g = unpoison(self.group.lock());
            while g.epoch == epoch {
                g = unpoison(self.committed.wait(g));
            }
            if let Some(why) = g.failed.get(&epoch) {
                return Err(StoreError::CommitFailed(why.clone()));
            }
        }
        match out {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Marks `epoch` committed (or failed) and wakes the writers waiting on it.
    fn finish(&self, epoch: u64, failure: Option<String>) {
        let mut g = unpoison(self.group.lock());
        g.open = false;
        g.epoch = epoch + 1;
        if let Some(why) = failure {
            g.failed.insert(epoch, why);
        }
        while g.failed.len() > 64 {
            g.failed.pop_first();
        }
        drop(g);
        self.committed.notify_all();
    }

    /// Runs `f` in one read transaction.
    pub(super) fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.reader();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
        f(&tx)
    }

    /// A free reader connection if there is one, else the next in turn.
    pub(super) fn reader(&self) -> MutexGuard<'_, Connection> {
        if self.readers.is_empty() {
            return self.writer();
        }
        for r in &self.readers {
            if let Ok(guard) = r.try_lock() {
                return guard;
            }
        }
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        unpoison(self.readers[i].lock())
    }
}
