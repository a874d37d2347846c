//! Connections and transactions: a small pool of blocking connections for
//! reads, each with its prepared statements, and the writer: a connection
//! of its own that pipelines (`session.rs`), on which write jobs share
//! transactions (group commit, as SQLite's writer), each job in its own
//! savepoint (the revision row's lock first), and what every job ends
//! with (the audit head, the row set, the notifications) done once at the
//! end of the batch; with retries.

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Row, Statement};

use super::conn::{self, PgConfig};
use super::session::{Answer, Cache, Pipelined, Session, Want};
use super::{audit, notify, row_set};
use crate::keys::Keys;
use crate::store::audit_chain::AuditHead;
use crate::store::{Change, Result, StoreError};

/// Connections kept: what `Store::concurrency` reports.
pub(super) const POOL_SIZE: usize = 8;

/// How often a write is tried when PostgreSQL reports a serialization
/// failure or a deadlock (it rolled the transaction back: nothing written).
const ATTEMPTS: u32 = 5;

pub(super) use super::session::Params;

/// A statement's parameters, owned: a statement sent later (see
/// [`Tx::later`]) outlives the values its caller had.
pub(super) type Owned = Vec<Box<dyn ToSql + Sync + Send>>;

/// [`Owned`] parameters from values: `owned![a, b]`.
macro_rules! owned {
    ($($v:expr),* $(,)?) => {
        vec![$(Box::new($v) as Box<dyn ::postgres::types::ToSql + Sync + Send>),*]
    };
}
pub(super) use owned;

/// One connection and its prepared statements (`Client::prepare` is a
/// round trip; one change runs some thirty statements).
pub(super) struct Conn<C = postgres::Client> {
    client: C,
    cache: Cache,
}

pub(super) struct Pool {
    cfg: PgConfig,
    idle: Mutex<Vec<Conn>>,
    busy: Mutex<usize>,
    freed: Condvar,
    /// Writes run on a connection of their own, in batches (see
    /// [`Pool::write`]); the pool's connections are for reads.
    writer: Writer,
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
            // A panic may have left a transaction open on it.
            if !conn.client.is_closed() && !std::thread::panicking() {
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
        let writer = self.writer.take_conn();
        // The driver's connections close by blocking on runtimes of their
        // own, which panics on an async thread: a store dropped there (a
        // server shutting down) closes them on a thread of their own.
        if (!idle.is_empty() || writer.is_some()) && tokio::runtime::Handle::try_current().is_ok() {
            let closing = std::thread::Builder::new()
                .name("secretfs-pg-close".into())
                .spawn(move || drop((idle, writer)));
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
            writer: Writer::new(),
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

    pub(super) fn parts(&mut self) -> (&mut postgres::Client, &mut Cache) {
        let c = self.conn.as_mut().expect("held until drop");
        (&mut c.client, &mut c.cache)
    }
}

/// What a write job carries from its statements to its end (the revision,
/// the audit head, the change to announce).
#[derive(Default)]
pub(super) struct Job {
    /// The revision this change commits at (taken first thing).
    pub revision: Option<u64>,
    /// The revision the batch's transaction holds the lock of, taken by
    /// an earlier kept change (the next is one after it).
    pub held_revision: Option<u64>,
    /// The audit head as this job sees it, its lock held: read under the
    /// lock, or kept from an earlier job of the batch (whose lock the
    /// batch's transaction holds); moved by each entry the job inserts.
    pub head: Option<AuditHead>,
    /// `head` was read from the database and its MAC is not checked yet.
    pub head_unchecked: bool,
    /// The job inserted audit entries: the head is written at the batch's
    /// end.
    pub head_moved: bool,
    /// What to announce on the database's channel at commit.
    pub change: Option<Change>,
    /// The row set's sealed record, as read at the end of the batch.
    pub row_set: Option<Option<Vec<u8>>>,
}

/// What checks a statement sent later: its answer, or its error (an error
/// must fail the job; a check may say which). It may note what it learnt
/// in the job.
type Check<'c> =
    Box<dyn FnOnce(&mut Job, std::result::Result<Answer, postgres::Error>) -> Result<()> + 'c>;

/// A statement waiting to be sent (see [`Tx::later`]).
struct Queued<'c> {
    st: Statement,
    want: Want,
    params: Owned,
    check: Check<'c>,
}

/// A statement run in a transaction the caller opened on `client` (a read
/// transaction, a write batch's savepoint), with the connection's
/// statement cache. The transaction is begun and ended with plain
/// statements (`BEGIN`, `SAVEPOINT`, `COMMIT`): a write batch's
/// transaction outlives each job's borrow of the connection.
///
/// Statements whose answer is only checked (most writes) are sent later
/// ([`Tx::later`]): they wait until the next statement whose answer is
/// needed, or the end of the job, and go with it in one round trip, in
/// order, on a session that pipelines (the writer's).
pub(super) struct Tx<'c> {
    client: &'c mut dyn Session,
    cache: &'c mut Cache,
    pub job: Job,
    /// The master keys: in a write job.
    pub keys: Option<&'c Keys>,
    queued: Vec<Queued<'c>>,
    /// A statement of this transaction was sent.
    sent: bool,
}

/// Runs `f` in one transaction begun with `begin` on `client`, committed
/// if `f` succeeds and rolled back otherwise.
pub(super) fn in_transaction<T>(
    client: &mut postgres::Client,
    cache: &mut Cache,
    begin: &str,
    f: impl FnOnce(&mut Tx<'_>) -> Result<T>,
) -> Result<T> {
    client.batch_execute(begin)?;
    let out = outside_transaction(client, cache, f);
    match out {
        Ok(out) => {
            client.batch_execute("COMMIT")?;
            Ok(out)
        }
        Err(e) => {
            // A dead connection is dropped by its owner; a live one is
            // left outside any transaction.
            let _ = client.batch_execute("ROLLBACK");
            Err(e)
        }
    }
}

/// Runs `f`'s statements on `client` as they come (each its own
/// transaction, unless `f` is in one).
fn outside_transaction<T>(
    client: &mut postgres::Client,
    cache: &mut Cache,
    f: impl FnOnce(&mut Tx<'_>) -> Result<T>,
) -> Result<T> {
    let mut t = Tx::new(&mut *client, cache, None);
    let out = f(&mut t).and_then(|out| t.flush().map(|()| out));
    drop(t);
    out
}

fn refs(params: &Owned) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|b| &**b as &(dyn ToSql + Sync)).collect()
}

fn row_count(n: usize) -> StoreError {
    StoreError::Backend(format!("a statement returned {n} rows where one was expected").into())
}

impl<'c> Tx<'c> {
    fn new(client: &'c mut dyn Session, cache: &'c mut Cache, keys: Option<&'c Keys>) -> Tx<'c> {
        Tx {
            client,
            cache,
            job: Job::default(),
            keys,
            queued: Vec::new(),
            sent: false,
        }
    }

    fn stmt(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.cache.insert(sql, s.clone());
        Ok(s)
    }

    /// Sends `sql` with what waits to be sent, in one round trip, and
    /// checks what waited; `sql`'s own answer or error.
    fn now(
        &mut self,
        sql: &'static str,
        want: Want,
        p: Params<'_>,
    ) -> Result<std::result::Result<Answer, postgres::Error>> {
        let st = self.stmt(sql)?;
        self.sent = true;
        if self.queued.is_empty() {
            return Ok(match want {
                Want::Rows => self.client.query(&st, p).map(Answer::Rows),
                Want::Count => self.client.execute(&st, p).map(Answer::Count),
            });
        }
        let mut answers = self.send(Some((&st, want, p)))?;
        answers
            .pop()
            .ok_or_else(|| StoreError::Backend("a statement sent before it failed".into()))
    }

    /// Sends what waits (and `last`), then runs the checks of what waited,
    /// in order; the answers left (`last`'s).
    fn send(
        &mut self,
        last: Option<(&Statement, Want, Params<'_>)>,
    ) -> Result<Vec<std::result::Result<Answer, postgres::Error>>> {
        let queued = std::mem::take(&mut self.queued);
        let mut answers = {
            let params: Vec<_> = queued.iter().map(|q| refs(&q.params)).collect();
            let mut items: Vec<(&Statement, Want, Params<'_>)> = queued
                .iter()
                .zip(&params)
                .map(|(q, p)| (&q.st, q.want, p.as_slice()))
                .collect();
            items.extend(last);
            self.sent = true;
            self.client.pipeline(&items).into_iter()
        };
        for q in queued {
            match answers.next() {
                Some(answer) => (q.check)(&mut self.job, answer)?,
                None => {
                    return Err(StoreError::Backend(
                        "a statement sent before it failed".into(),
                    ))
                }
            }
        }
        Ok(answers.collect())
    }

    /// Queues `sql` to be sent with the next statement whose answer is
    /// needed (or at [`flush`](Self::flush)); `check` sees its answer.
    pub fn later(
        &mut self,
        sql: &'static str,
        want: Want,
        params: Owned,
        check: impl FnOnce(&mut Job, std::result::Result<Answer, postgres::Error>) -> Result<()> + 'c,
    ) -> Result<()> {
        let st = self.stmt(sql)?;
        self.queued.push(Queued {
            st,
            want,
            params,
            check: Box::new(check),
        });
        Ok(())
    }

    /// As [`later`](Self::later), for a statement that only has to succeed.
    pub fn later_exec(&mut self, sql: &'static str, params: Owned) -> Result<()> {
        self.later(sql, Want::Count, params, |_, answer| {
            answer.map(drop).map_err(StoreError::from)
        })
    }

    /// As [`later`](Self::later), for a statement that returns exactly one
    /// row, which `check` sees.
    pub fn later_one(
        &mut self,
        sql: &'static str,
        params: Owned,
        check: impl FnOnce(&mut Job, Row) -> Result<()> + 'c,
    ) -> Result<()> {
        self.later(sql, Want::Rows, params, |job, answer| {
            let mut rows = answer?.into_rows();
            match rows.len() {
                1 => check(job, rows.pop().expect("one row")),
                n => Err(row_count(n)),
            }
        })
    }

    /// Sends what waits, and checks it.
    pub fn flush(&mut self) -> Result<()> {
        if !self.queued.is_empty() {
            self.send(None)?;
        }
        Ok(())
    }

    pub fn query(&mut self, sql: &'static str, p: Params<'_>) -> Result<Vec<Row>> {
        Ok(self.now(sql, Want::Rows, p)??.into_rows())
    }

    pub fn opt(&mut self, sql: &'static str, p: Params<'_>) -> Result<Option<Row>> {
        let mut rows = self.query(sql, p)?;
        match rows.len() {
            0 | 1 => Ok(rows.pop()),
            n => Err(row_count(n)),
        }
    }

    pub fn one(&mut self, sql: &'static str, p: Params<'_>) -> Result<Row> {
        self.try_one(sql, p)?.map_err(StoreError::from)
    }

    pub fn exec(&mut self, sql: &'static str, p: Params<'_>) -> Result<u64> {
        self.try_exec(sql, p)?.map_err(StoreError::from)
    }

    /// As [`exec`](Self::exec), the driver's error kept (a unique
    /// violation the caller maps).
    pub fn try_exec(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<std::result::Result<u64, postgres::Error>> {
        Ok(self.now(sql, Want::Count, p)?.map(|a| match a {
            Answer::Count(n) => n,
            Answer::Rows(rows) => rows.len() as u64,
        }))
    }

    /// As [`one`](Self::one), the driver's error kept.
    pub fn try_one(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
    ) -> Result<std::result::Result<Row, postgres::Error>> {
        match self.now(sql, Want::Rows, p)? {
            Err(e) => Ok(Err(e)),
            Ok(answer) => {
                let mut rows = answer.into_rows();
                match rows.len() {
                    1 => Ok(Ok(rows.pop().expect("one row"))),
                    n => Err(row_count(n)),
                }
            }
        }
    }

    /// Rows one at a time (never the whole result in memory): `f` sees
    /// each; `Ok(false)` stops.
    pub fn each(
        &mut self,
        sql: &'static str,
        p: Params<'_>,
        mut f: impl FnMut(&Row) -> Result<bool>,
    ) -> Result<()> {
        self.flush()?;
        let st = self.stmt(sql)?;
        self.sent = true;
        self.client.each(&st, p, &mut f)
    }

    pub fn batch(&mut self, sql: &str) -> Result<()> {
        self.flush()?;
        self.sent = true;
        Ok(self.client.batch_execute(sql)?)
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

/// The write batch: the transaction open on the writer connection, and
/// the commits writers wait for.
#[derive(Default)]
struct Group {
    /// A transaction is open on the writer connection.
    open: bool,
    /// Jobs run in the open transaction.
    jobs: usize,
    /// A kept job of the open transaction holds the revision row's lock.
    revision: bool,
    /// An audit-only job of the open transaction took (or may still hold)
    /// the audit head's lock.
    head: bool,
    /// Bumped by every end of a transaction; a writer waits for the one
    /// after its job.
    epoch: u64,
    /// COMMITs sent (tests count them).
    commits: u64,
    /// Epochs whose transaction did not commit, with why (rare; pruned).
    failed: std::collections::BTreeMap<u64, Failed>,
}

/// Why a batch did not commit, for every writer whose job was in it.
#[derive(Clone, Debug)]
enum Failed {
    /// A serialization failure or deadlock at COMMIT: nothing was
    /// written; every job is run again.
    Conflict(String),
    /// The connection was lost before COMMIT: nothing was written.
    Lost(String),
    /// COMMIT failed (nothing was written), or the statements that end a
    /// job's savepoint did.
    Commit(String),
    /// The connection was lost during COMMIT: the outcome is unknown.
    Unknown(String),
}

impl Failed {
    fn error(&self) -> Again {
        match self {
            Failed::Conflict(why) => Again::Conflict(StoreError::CommitFailed(why.clone())),
            Failed::Lost(why) => Again::Lost(StoreError::Unavailable(why.clone())),
            Failed::Commit(why) => Again::No(StoreError::CommitFailed(why.clone())),
            Failed::Unknown(why) => Again::No(StoreError::OutcomeUnknown(why.clone())),
        }
    }
}

/// A write attempt's failure, and whether the writer tries again.
enum Again {
    /// A serialization failure or deadlock: nothing of this job was
    /// written; again after a backoff.
    Conflict(StoreError),
    /// The connection was lost before COMMIT: nothing was written; once
    /// more on a new connection.
    Lost(StoreError),
    /// Final.
    No(StoreError),
}

/// Jobs one transaction takes at most: the revision row's lock is held
/// across the whole batch, so other replicas' writers wait for it; and
/// each job's savepoint is a subtransaction, of which PostgreSQL caches 64
/// per transaction (past that every snapshot in the database gets slower;
/// the savepoints nest, unreleased, to COMMIT: 32 deep at most).
const MAX_BATCH: usize = 32;

/// The writer: its own connection (reads never wait for a batch), the
/// batch's state, and the writers queued for the connection.
pub(super) struct Writer {
    conn: Mutex<Option<WriterConn>>,
    group: Mutex<Group>,
    committed: Condvar,
    /// Writers waiting for the connection: while there are any, a writer
    /// leaves the transaction open for them instead of committing.
    waiting: AtomicUsize,
}

impl Writer {
    pub(super) fn new() -> Writer {
        Writer {
            conn: Mutex::new(None),
            group: Mutex::new(Group::default()),
            committed: Condvar::new(),
            waiting: AtomicUsize::new(0),
        }
    }

    /// The writer's connection, if made (the pool's drop closes it).
    pub(super) fn take_conn(&self) -> Option<WriterConn> {
        unpoison(self.conn.lock()).take()
    }
}

/// The writer's connection (one that pipelines), and what the open
/// batch's transaction holds.
pub(super) struct WriterConn {
    conn: Conn<Pipelined>,
    /// The audit head, locked by a kept job of the open transaction, as
    /// its last kept job left it (the next job starts from it instead of
    /// reading it again); none outside a transaction.
    head: Option<AuditHead>,
    /// The revision the last kept change of the open transaction took
    /// (its lock held by the transaction): the next change takes the one
    /// after without waiting for the answer.
    revision: Option<u64>,
    /// What the batch's kept jobs left for its end (see [`Deferred`]).
    deferred: Deferred,
}

/// What every job of a batch would otherwise end with, done once at the
/// batch's end, before COMMIT: the audit head its entries moved is
/// written (and checked to have no entry after it), the row set's pending
/// shares are folded into the record, the changes are announced. A job
/// that reads the row set record or the head from the database itself (a
/// `Write::Locked` one) never joins a batch with something deferred.
#[derive(Default)]
struct Deferred {
    head_moved: bool,
    /// A kept job may have changed protected rows (pending shares).
    shares: bool,
    /// The notifications, in commit order.
    notify: Vec<String>,
}

impl Deferred {
    fn any(&self) -> bool {
        self.head_moved || self.shares || !self.notify.is_empty()
    }
}

impl Pool {
    /// COMMITs the writer sent (each covers one or more write jobs).
    #[cfg(test)]
    pub(super) fn commits(&self) -> u64 {
        unpoison(self.writer.group.lock()).commits
    }

    /// Writers waiting for the writer connection.
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.writer.waiting.load(SeqCst)
    }

    /// Runs `f` as one write job and returns once it is durable: the
    /// write's first lock (see [`Write`]) and `f`, in a transaction (READ
    /// COMMITTED: every statement after the lock sees every change
    /// committed before) whose end (see [`Deferred`]) writes the audit
    /// head, folds the row set and announces the changes.
    ///
    /// Group commit, as SQLite's writer: a durable COMMIT (a WAL flush)
    /// costs more than the statements of a change, and the revision row's
    /// lock makes changes queue anyway, so writers that queue while one is
    /// working share its transaction on the writer connection. Each job
    /// runs in its own savepoint (a failing job rolls back alone, its
    /// revision with it); the last writer of a burst commits for all, and
    /// every writer returns only after the COMMIT that covers its job. A
    /// failed COMMIT fails every job in it (`CommitFailed`).
    ///
    /// Retries: a job that fails with a serialization failure or deadlock
    /// is rolled back to its savepoint (its locks released, so the other
    /// side goes on once this batch commits) and run again in a later
    /// transaction, after a backoff; the others commit. Should COMMIT
    /// itself fail so, every job of the batch is run again by its writer.
    /// A connection lost before COMMIT (PostgreSQL restarted) fails the
    /// whole batch, and each job is run once more on a new connection.
    /// `f` (and a seal callback in it) may so be called more than once;
    /// nothing of an earlier call is kept.
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
            match self.write_in_batch(keys, kind, &mut f) {
                Ok(out) => return Ok(out),
                Err(Again::Conflict(_)) if attempt < ATTEMPTS => {
                    std::thread::sleep(backoff(attempt));
                }
                Err(Again::Lost(_)) if !fresh => fresh = true,
                Err(Again::Conflict(e) | Again::Lost(e) | Again::No(e)) => return Err(e),
            }
        }
    }

    fn write_in_batch<T>(
        &self,
        keys: &Keys,
        kind: Write,
        f: &mut impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> std::result::Result<T, Again> {
        let w = &self.writer;
        w.waiting.fetch_add(1, SeqCst);
        let mut slot = unpoison(w.conn.lock());
        w.waiting.fetch_sub(1, SeqCst);
        let (open, jobs, revision, head) = {
            let g = unpoison(w.group.lock());
            (g.open, g.jobs, g.revision, g.head)
        };
        // One lock order, revision row then audit head: a transaction that
        // may hold the head (an audit-only job's) without the revision row
        // is committed before a write that takes the row joins.
        let lock_order = kind != Write::AuditOnly && head && !revision;
        // A job that reads the row set or the head itself sees them whole.
        let whole = kind == Write::Locked
            && slot
                .as_ref()
                .is_some_and(|c| c.deferred.any() || c.revision.is_some());
        if open && (lock_order || whole || jobs >= MAX_BATCH) {
            // For the jobs in it (their writers see how it ended); this
            // one goes in the next.
            self.end_batch(&mut slot, keys);
        }
        if !unpoison(w.group.lock()).open {
            self.begin(&mut slot)?;
        }
        let epoch = {
            let mut g = unpoison(w.group.lock());
            g.jobs += 1;
            // The head's lock may be held from here; the revision row's
            // only once a job that took it is kept (one rolled back to its
            // savepoint released it).
            if kind == Write::AuditOnly {
                g.head = true;
            }
            g.epoch
        };
        let wc = slot.as_mut().expect("a transaction is open on it");
        let (client, cache) = (&mut wc.conn.client, &mut wc.conn.cache);
        let mut t = Tx::new(&mut *client, &mut *cache, Some(keys));
        t.job.head = wc.head.clone();
        t.job.held_revision = wc.revision;
        // The job's result, or its panic (resumed once the batch is safe).
        let out =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(&mut t, kind, f)));
        let (sent, head, revision) = (t.sent, t.job.head.take(), t.job.revision);
        let (head_moved, change) = (t.job.head_moved, t.job.change);
        drop(t);
        let kept = matches!(out, Ok(Ok(_)));
        let closed = if kept {
            // Its savepoint stays open to COMMIT: the locks it took (the
            // head's) are held with it.
            wc.head = head;
            if revision.is_some() {
                wc.revision = revision;
            }
            if kind != Write::AuditOnly {
                unpoison(w.group.lock()).revision = true;
            }
            let d = &mut wc.deferred;
            d.head_moved |= head_moved;
            d.shares |= kind != Write::AuditOnly;
            d.notify.extend(change.map(|c| notify::payload(&c)));
            Ok(())
        } else if sent {
            // The head as before the job: its lock is held if it was.
            client.batch_execute("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job")
        } else {
            // Nothing of it was sent: no savepoint to roll back to.
            Ok(())
        };
        if let Err(e) = closed {
            // The transaction is in an unknown state (or the connection is
            // gone): end it for everyone.
            let lost = conn::is_connection_error(&e) || client.is_closed();
            let _ = client.batch_execute("ROLLBACK");
            let failure = if lost {
                *slot = None;
                Failed::Lost(lost_before(&conn::describe(&e)))
            } else {
                Failed::Commit(StoreError::from(e).to_string())
            };
            self.finish(epoch, Some(failure.clone()));
            drop(slot);
            return match out {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(Err(e)) if retryable(&e) => Err(Again::Conflict(e)),
                _ => Err(failure.error()),
            };
        }
        if w.waiting.load(SeqCst) == 0 || kind == Write::Locked {
            // The last writer of the burst commits for all; a job that
            // may have moved the row set or the keys' epoch (a rekey's)
            // ends its batch with its own keys, alone.
            self.end_batch(&mut slot, keys);
        }
        drop(slot);
        match out {
            Err(panic) => std::panic::resume_unwind(panic),
            // The job wrote nothing: its own error, whatever the batch does.
            Ok(Err(e)) if retryable(&e) => Err(Again::Conflict(e)),
            Ok(Err(e)) => Err(Again::No(e)),
            Ok(Ok(v)) => {
                self.wait_for(epoch).map_err(|f| f.error())?;
                Ok(v)
            }
        }
    }

    /// Opens the batch's transaction on the writer connection (made if
    /// there is none; a closed one is replaced, once more if BEGIN finds
    /// it dead).
    fn begin(&self, slot: &mut Option<WriterConn>) -> std::result::Result<(), Again> {
        for tries in 0.. {
            if slot.as_ref().is_some_and(|c| c.conn.client.is_closed()) {
                *slot = None;
            }
            let reused = slot.is_some();
            if slot.is_none() {
                *slot = Some(WriterConn {
                    conn: Conn {
                        client: conn::connect_pipelined(&self.cfg).map_err(Again::No)?,
                        cache: HashMap::new(),
                    },
                    head: None,
                    revision: None,
                    deferred: Deferred::default(),
                });
            }
            let wc = slot.as_mut().expect("just made");
            wc.head = None;
            wc.revision = None;
            wc.deferred = Deferred::default();
            let c = &mut wc.conn;
            match c.client.batch_execute("BEGIN") {
                Ok(()) => break,
                Err(e) if reused && tries == 0 && conn::is_connection_error(&e) => {
                    // An idle connection that died (PostgreSQL restarted).
                    *slot = None;
                }
                Err(e) => {
                    if c.client.is_closed() {
                        *slot = None;
                    }
                    return Err(Again::No(e.into()));
                }
            }
        }
        let mut g = unpoison(self.writer.group.lock());
        g.open = true;
        g.jobs = 0;
        g.revision = false;
        g.head = false;
        Ok(())
    }

    /// Ends the open transaction for every job in it (what they deferred,
    /// then COMMIT) and wakes their writers; its epoch (`None`: nothing
    /// was open).
    fn end_batch(&self, slot: &mut Option<WriterConn>, keys: &Keys) -> Option<u64> {
        let epoch = {
            let g = unpoison(self.writer.group.lock());
            if !g.open {
                return None;
            }
            g.epoch
        };
        let wc = slot.as_mut().expect("a transaction is open on it");
        let head = wc.head.take();
        let revision = wc.revision.take();
        let deferred = std::mem::take(&mut wc.deferred);
        let conn = &mut wc.conn;
        // A panic here would leave the batch open with its state taken:
        // the transaction is dropped with its connection, and every job of
        // it fails, before the panic goes on.
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut t = Tx::new(&mut conn.client, &mut conn.cache, Some(keys));
            match end_jobs(&mut t, keys, head, revision, deferred) {
                Err(e) => Err(e),
                // COMMIT goes with the jobs' last writes, which only have
                // to succeed: had one failed, COMMIT would roll back.
                // Whatever fails in this round trip is COMMIT's outcome.
                Ok(()) => Ok(t
                    .now("COMMIT", Want::Count, &[])
                    .and_then(|r| r.map(drop).map_err(StoreError::from))),
            }
        }));
        unpoison(self.writer.group.lock()).commits += 1;
        let outcome = match ended {
            Ok(outcome) => outcome,
            Err(panic) => {
                *slot = None;
                self.finish(
                    epoch,
                    Some(Failed::Commit("the end of the batch panicked".into())),
                );
                std::panic::resume_unwind(panic);
            }
        };
        let failure = match outcome {
            Ok(Ok(())) => None,
            // Before COMMIT was sent: nothing was committed.
            Err(e) => Some(rolled_back(conn, e, |why| Failed::Lost(lost_before(&why)))),
            // In COMMIT's round trip: committed or not, unless the
            // connection still answers.
            Ok(Err(e)) => Some(rolled_back(conn, e, Failed::Unknown)),
        };
        if matches!(failure, Some(Failed::Lost(_) | Failed::Unknown(_))) {
            *slot = None;
        }
        self.finish(epoch, failure);
        Some(epoch)
    }

    /// Marks `epoch`'s transaction ended (committed, or not with why) and
    /// wakes the writers waiting on it.
    fn finish(&self, epoch: u64, failure: Option<Failed>) {
        let mut g = unpoison(self.writer.group.lock());
        g.open = false;
        g.epoch = epoch + 1;
        if let Some(why) = failure {
            g.failed.insert(epoch, why);
        }
        while g.failed.len() > 64 {
            g.failed.pop_first();
        }
        drop(g);
        self.writer.committed.notify_all();
    }

    /// Waits until `epoch`'s transaction has ended; why it did not commit.
    fn wait_for(&self, epoch: u64) -> std::result::Result<(), Failed> {
        let mut g = unpoison(self.writer.group.lock());
        while g.epoch == epoch {
            g = unpoison(self.writer.committed.wait(g));
        }
        match g.failed.get(&epoch) {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Runs `f` in one read transaction (REPEATABLE READ, read only: every
    /// statement sees the same snapshot, as SQLite's read transaction), on
    /// a pooled connection (never the writer's).
    pub(super) fn read<T>(&self, f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.read_in(true, f)
    }

    /// As [`read`](Self::read), for one statement: no transaction around
    /// it (a statement sees one snapshot), so one round trip.
    pub(super) fn read_one<T>(&self, f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.read_in(false, f)
    }

    fn read_in<T>(
        &self,
        transaction: bool,
        mut f: impl FnMut(&mut Tx<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut fresh = false;
        loop {
            let mut pooled = self.get_fresh(fresh)?;
            let reused = pooled.reused;
            let (client, cache) = pooled.parts();
            let out = if transaction {
                in_transaction(
                    client,
                    cache,
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
                    &mut f,
                )
            } else {
                outside_transaction(client, cache, &mut f)
            };
            match out {
                Err(StoreError::Unavailable(_)) if reused && !fresh && pooled.is_dead() => {
                    fresh = true
                }
                other => return other,
            }
        }
    }
}

/// The end of a batch's jobs (see [`Deferred`]): one round trip, and
/// the row set's write left queued to go with COMMIT (row_set::flush reads
/// the pending shares: that round trip checks what came before it).
fn end_jobs(
    t: &mut Tx<'_>,
    keys: &Keys,
    head: Option<AuditHead>,
    revision: Option<u64>,
    deferred: Deferred,
) -> Result<()> {
    if let Some(v) = revision {
        t.later_exec(
            "UPDATE revision SET value = $1 WHERE id = 1",
            owned![v as i64],
        )?;
    }
    if deferred.head_moved {
        let head = head.ok_or_else(|| StoreError::Backend("the audit head moved unheld".into()))?;
        audit::close(t, keys, &head)?;
    }
    if !deferred.notify.is_empty() {
        t.later_exec(
            "SELECT pg_notify($1, p) FROM unnest($2::TEXT[]) WITH ORDINALITY AS n(p, i) ORDER BY i",
            owned![notify::CHANNEL.to_owned(), deferred.notify],
        )?;
    }
    // Audit entries are not protected rows: nothing to fold for them.
    // Everything whose check reads its answer is sent and checked here,
    // before COMMIT (which would commit whatever a check then refused):
    // what stays queued only has to succeed.
    if deferred.shares {
        row_set::flush(t, keys)
    } else {
        t.flush()
    }
}

/// Why a batch whose end failed with `e` did not commit: its transaction
/// is rolled back, and if the connection no longer answers (a timeout is
/// Unavailable too, on a sound connection: the ROLLBACK tells them apart)
/// it is `if_lost`.
fn rolled_back(conn: &mut Conn<Pipelined>, e: StoreError, if_lost: fn(String) -> Failed) -> Failed {
    let why = e.to_string();
    if conn.client.is_closed() || conn.client.batch_execute("ROLLBACK").is_err() {
        if_lost(why)
    } else if retryable(&e) {
        Failed::Conflict(why)
    } else {
        Failed::Commit(why)
    }
}

fn lost_before(why: &str) -> String {
    format!("the connection to PostgreSQL was lost before the change was committed: nothing was written ({why})")
}

/// One write job in its savepoint: the write's first lock and `f`. After
/// the first job of a batch (which waits for the revision and the head),
/// a rotation read off the lock is one round trip: savepoint, secret,
/// version and audit entry together. What every job ends with is the
/// batch's end (see [`Deferred`]).
fn run_job<T>(
    t: &mut Tx<'_>,
    kind: Write,
    f: &mut impl FnMut(&mut Tx<'_>) -> Result<T>,
) -> Result<T> {
    t.later_exec("SAVEPOINT job", owned![])?;
    match kind {
        Write::Change => {
            const NEXT: &str = "UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value";
            match t.job.held_revision {
                // The lock is the transaction's: the next revision is
                // known, and written once at the batch's end.
                Some(held) => t.job.revision = Some(held + 1),
                None => {
                    t.later_one(NEXT, owned![], |job, row| {
                        job.revision = Some(row.try_get::<_, i64>(0)? as u64);
                        Ok(())
                    })?;
                }
            }
            // Every change is audited: the head's lock now, in one order
            // after the revision's; the first change of a transaction waits
            // for both (what it writes needs them).
            audit::lock_head(t)?;
            if t.job.revision.is_none() {
                t.flush()?;
            }
        }
        Write::Locked => {
            t.later_one(
                "SELECT value FROM revision WHERE id = 1 FOR UPDATE",
                owned![],
                |_, _| Ok(()),
            )?;
        }
        Write::AuditOnly => {}
    }
    let out = f(t)?;
    // What every job ends with is done once, at the batch's end.
    // Its savepoint is left open (nested in the earlier jobs' until the
    // batch's COMMIT): a check of its last answers can still fail it, and
    // releasing it would be one more round trip.
    t.flush()?;
    Ok(out)
}
