//! Connections and transactions: a small pool of blocking connections,
//! each with its prepared statements, and the write transaction every
//! change runs in (the revision row's lock first, the audit chain and the
//! row set at its end, the notification, retries).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{IsolationLevel, Row, Statement};

use super::conn::{self, PgConfig};
use super::{audit, notify, row_set};
use crate::keys::Keys;
use crate::store::{AuditEntry, Change, Result, StoreError};

/// Connections kept: what `Store::concurrency` reports.
pub(super) const POOL_SIZE: usize = 8;

/// How often a write is tried when PostgreSQL reports a serialization
/// failure or a deadlock (it rolled the transaction back: nothing written).
const ATTEMPTS: u32 = 5;

pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// One connection and its prepared statements (`Client::prepare` is a
/// round trip; one change runs some thirty statements).
pub(super) struct Conn {
    client: postgres::Client,
    cache: HashMap<&'static str, Statement>,
}

pub(super) struct Pool {
    cfg: PgConfig,
    idle: Mutex<Vec<Conn>>,
    busy: Mutex<usize>,
    freed: Condvar,
}

fn unpoison<T>(r: std::sync::LockResult<T>) -> T {
    r.unwrap_or_else(|e| e.into_inner())
}

/// A connection taken from the pool; given back (if still sound) on drop.
pub(super) struct Pooled<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
    /// Taken from the idle list (it may have died meanwhile).
    reused: bool,
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if !conn.client.is_closed() {
                unpoison(self.pool.idle.lock()).push(conn);
            }
        }
        *unpoison(self.pool.busy.lock()) -= 1;
        self.pool.freed.notify_one();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let idle = std::mem::take(&mut *unpoison(self.idle.lock()));
        // The driver's connections close by blocking on runtimes of their
        // own, which panics on an async thread: a store dropped there (a
        // server shutting down) closes them on a thread of their own.
        if !idle.is_empty() && tokio::runtime::Handle::try_current().is_ok() {
            let closing = std::thread::Builder::new()
                .name("secretfs-pg-close".into())
                .spawn(move || drop(idle));
            if let Err(e) = closing {
                tracing::warn!(error = %e, "could not close the PostgreSQL connections");
            }
        }
    }
}

impl Pool {
    pub(super) fn new(cfg: PgConfig) -> Pool {
        Pool {
            cfg,
            idle: Mutex::new(Vec::new()),
            busy: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    pub(super) fn cfg(&self) -> &PgConfig {
        &self.cfg
    }

    /// A connection: an idle one, else a new one (a broken one is dropped
    /// and replaced here). At most [`POOL_SIZE`] are out at once.
    pub(super) fn get(&self) -> Result<Pooled<'_>> {
        self.get_fresh(false)
    }

    fn get_fresh(&self, fresh: bool) -> Result<Pooled<'_>> {
        {
            let mut busy = unpoison(self.busy.lock());
            while *busy >= POOL_SIZE {
                busy = unpoison(self.freed.wait(busy));
            }
            *busy += 1;
        }
        // From here the slot is given back by `Pooled`'s drop.
        let mut out = Pooled {
            pool: self,
            conn: None,
            reused: false,
        };
        if !fresh {
            let mut idle: MutexGuard<'_, Vec<Conn>> = unpoison(self.idle.lock());
            while let Some(c) = idle.pop() {
                if !c.client.is_closed() {
                    out.conn = Some(c);
                    out.reused = true;
                    break;
                }
            }
        }
        if out.conn.is_none() {
            out.conn = Some(Conn {
                client: conn::connect(&self.cfg)?,
                cache: HashMap::new(),
            });
        }
        Ok(out)
    }
}

impl Pooled<'_> {
    /// Whether the connection died (only then is a failed call worth a
    /// new one: a lock or statement timeout is Unavailable on a sound
    /// connection, which is kept). A round trip, on that error path only.
    fn is_dead(&mut self) -> bool {
        let client = self.client();
        client.is_closed() || client.is_valid(Duration::from_secs(2)).is_err()
    }

    pub(super) fn client(&mut self) -> &mut postgres::Client {
        &mut self.conn.as_mut().expect("held until drop").client
    }

    pub(super) fn parts(
        &mut self,
    ) -> (&mut postgres::Client, &mut HashMap<&'static str, Statement>) {
        let c = self.conn.as_mut().expect("held until drop");
        (&mut c.client, &mut c.cache)
    }
}

/// What a write job leaves for its end (the audit entries to chain, the
/// change to announce).
#[derive(Default)]
pub(super) struct Job {
    /// The revision this change commits at (taken first thing).
    pub revision: Option<u64>,
    /// The head's lock is held, and the id the next entry gets.
    pub next_audit_id: Option<u64>,
    /// The head as read under that lock.
    pub head: Option<crate::store::audit_chain::AuditHead>,
    /// The entries this job inserted, as inserted (chained at its end).
    pub audit: Vec<AuditEntry>,
    /// What to announce on the database's channel at commit.
    pub change: Option<Change>,
}

/// A transaction with its connection's statement cache.
pub(super) struct Tx<'c> {
    tx: postgres::Transaction<'c>,
    cache: &'c mut HashMap<&'static str, Statement>,
    pub job: Job,
}

impl<'c> Tx<'c> {
    pub(super) fn new(
        tx: postgres::Transaction<'c>,
        cache: &'c mut HashMap<&'static str, Statement>,
    ) -> Self {
        Tx {
            tx,
            cache,
            job: Job::default(),
        }
    }

    pub(super) fn commit(self) -> Result<()> {
        Ok(self.tx.commit()?)
    }

    fn stmt(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql)?;
        self.cache.insert(sql, s.clone());
        Ok(s)
    }

    pub fn query(&mut self, sql: &'static str, p: Params<'_>) -> Result<Vec<Row>> {
        let st = self.stmt(sql)?;
        Ok(self.tx.query(&st, p)?)
    }

    pub fn opt(&mut self, sql: &'static str, p: Params<'_>) -> Result<Option<Row>> {
        let st = self.stmt(sql)?;
        Ok(self.tx.query_opt(&st, p)?)
    }

    pub fn one(&mut self, sql: &'static str, p: Params<'_>) -> Result<Row> {
        let st = self.stmt(sql)?;
        Ok(self.tx.query_one(&st, p)?)
    }

    pub fn exec(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64> {
        let st = self.stmt(sql)?;
        Ok(self.tx.execute(&st, p)?)
    }

    /// As [`exec`](Self::exec), the driver's error kept (a unique
    /// violation the caller maps).
    pub fn try_exec(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<std::result::Result<u64, postgres::Error>> {
        let st = self.stmt(sql)?;
        Ok(self.tx.execute(&st, p))
    }

    /// As [`one`](Self::one), the driver's error kept.
    pub fn try_one(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<std::result::Result<Row, postgres::Error>> {
        let st = self.stmt(sql)?;
        Ok(self.tx.query_one(&st, p))
    }

    /// Rows one at a time (never the whole result in memory): `f` sees
    /// each; `Ok(false)` stops.
    pub fn each(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
        mut f: impl FnMut(&Row) -> Result<bool>,
    ) -> Result<()> {
        use postgres::fallible_iterator::FallibleIterator;
        let st = self.stmt(sql)?;
        let mut rows = self.tx.query_raw(&st, p.iter().copied())?;
        while let Some(row) = rows.next()? {
            if !f(&row)? {
                break;
            }
        }
        Ok(())
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        Ok(self.tx.batch_execute(sql)?)
    }
}

/// What a write takes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Write {
    /// A change: the next revision (the revision row's lock, held to
    /// commit: every writer on every replica is serialised, and commit
    /// order is revision order).
    Change,
    /// A write that changes no revision but protected rows (metadata, a
    /// rekey's steps, the row set): the revision row's lock, so it is
    /// serialised with every change.
    Locked,
    /// Audit entries only: the audit head's lock (taken at the first
    /// insert), never the revision's, so reads' audits do not queue
    /// behind changes longer than their own insert.
    AuditOnly,
}

fn retryable(e: &StoreError) -> bool {
    matches!(
        conn::code_of(e),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// A small jittered backoff before attempt `n` (1-based).
fn backoff(n: u32) -> Duration {
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() % 5_000_000)
        .unwrap_or(0);
    Duration::from_millis(5u64 << n.min(6)) + Duration::from_nanos(u64::from(jitter))
}

impl Pool {
    /// Runs `f` in a write transaction (READ COMMITTED: every statement
    /// after the lock sees every change committed before), then the end of
    /// every write job (the audit chain, the row set, the notification),
    /// and commits. Retried whole on a serialization failure or deadlock,
    /// and once on a connection found dead before anything was sent.
    pub(super) fn write<T>(
        &self,
        keys: &Keys,
        kind: Write,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut attempt = 0;
        let mut fresh = false;
        loop {
            attempt += 1;
            let mut pooled = self.get_fresh(fresh)?;
            let reused = pooled.reused;
            match write_once(&mut pooled, keys, kind, &mut f) {
                Err(Failure::Before(e)) if retryable(&e) && attempt < ATTEMPTS => {
                    drop(pooled);
                    std::thread::sleep(backoff(attempt));
                }
                Err(Failure::Before(StoreError::Unavailable(_)))
                    if reused && !fresh && pooled.is_dead() =>
                {
                    // An idle connection that died (PostgreSQL restarted):
                    // nothing was written; once more on a new one.
                    fresh = true;
                }
                Err(Failure::Before(e)) | Err(Failure::Commit(e)) => return Err(e),
                Ok(out) => return Ok(out),
            }
        }
    }

    /// Runs `f` in one read transaction (REPEATABLE READ, read only: every
    /// statement sees the same snapshot, as SQLite's read transaction).
    pub(super) fn read<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut fresh = false;
        loop {
            let mut pooled = self.get_fresh(fresh)?;
            let reused = pooled.reused;
            let (client, cache) = pooled.parts();
            let out = (|| {
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let mut t = Tx {
                    tx,
                    cache,
                    job: Job::default(),
                };
                let out = f(&mut t)?;
                t.tx.commit()?;
                Ok(out)
            })();
            match out {
                Err(StoreError::Unavailable(_)) if reused && !fresh && pooled.is_dead() => {
                    fresh = true
                }
                other => return other,
            }
        }
    }
}

enum Failure {
    /// Before COMMIT was sent: nothing was written.
    Before(StoreError),
    /// COMMIT failed.
    Commit(StoreError),
}

fn write_once<T>(
    pooled: &mut Pooled<'_>,
    keys: &Keys,
    kind: Write,
    f: &mut impl FnMut(&mut Tx<'_>) -> Result<T>,
) -> std::result::Result<T, Failure> {
    let (client, cache) = pooled.parts();
    let tx = client
        .transaction()
        .map_err(|e| Failure::Before(e.into()))?;
    let mut t = Tx {
        tx,
        cache,
        job: Job::default(),
    };
    let out = (|| {
        match kind {
            Write::Change => {
                let v: i64 = t
                    .one(
                        "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value",
                        &[],
                    )?
                    .try_get(0)?;
                t.job.revision = Some(v as u64);
            }
            Write::Locked => {
                t.one("SELECT value FROM revision WHERE id = 1 FOR UPDATE", &[])?;
            }
            Write::AuditOnly => {}
        }
        let out = f(&mut t)?;
        audit::chain_pending(&mut t, keys)?;
        // Audit entries are not protected rows: nothing to fold.
        if kind != Write::AuditOnly {
            row_set::flush(&mut t, keys)?;
        }
        if let Some(change) = t.job.change {
            let payload = notify::payload(&change);
            t.exec("SELECT pg_notify($1, $2)", &[&notify::CHANNEL, &payload])?;
        }
        Ok(out)
    })()
    .map_err(Failure::Before)?;
    let Tx { tx, .. } = t;
    tx.commit().map_err(|e| {
        Failure::Commit(if conn::is_connection_error(&e) {
            StoreError::OutcomeUnknown(conn::describe(&e))
        } else {
            e.into()
        })
    })?;
    Ok(out)
}
